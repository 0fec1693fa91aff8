"""Policy layers, one per module, each wrapping a `Handler` in one policy. `stack.py` orders them."""
