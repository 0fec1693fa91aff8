"""Durable delivery: accept a write with 202, keep it on disk (or in Redis), deliver it later.

model.py     a message, what an attempt came to, the retry schedule (pure)
store.py     the storage interface and its errors; open_store() picks a backend
sqlite_store.py  the default: one SQLite file under the state directory, group commit
redis_store.py   Redis Streams shared by every pod (optional extra sidecar[redis])
deliverer.py the loop that claims due messages and sends them
"""
