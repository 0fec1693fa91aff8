"""The short soak: 5,000 mixed requests with faults through a real sidecar; open fds stay flat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_five_thousand_mixed_requests_leave_no_fd_or_memory_growth() -> None:
    result = subprocess.run(
        [sys.executable, str(SOAK), "--requests", "5000", "--every", "1000", "--time-limit", "90",
         "--max-fd-growth", "16", "--max-rss-growth", "8"],
        capture_output=True, text=True, timeout=110,
    )
    report = json.loads(result.stdout)
    assert report["requests"] == 5000
    assert report["fd_growth"] <= 16, report["samples"]  # pooled sockets in flight, not a trend
    assert report["rss_growth_mib"] <= 8, report["samples"]
    assert result.returncode == 0, result.stderr[-2000:]
