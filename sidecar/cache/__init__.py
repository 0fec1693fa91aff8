"""A shared HTTP response cache for routes (issue 18): see docs/cache.md.

    rules.py     RFC 9111 rules as pure functions (storable, freshness, age, validators, Vary)
    store.py     a route's entries: LRU bounded in bytes
    coalesce.py  concurrent misses for one key share one upstream request
    policy.py    the decision per request, and when a stale entry may answer a failure
    layer.py     the layer of the route stack that puts them together
"""
