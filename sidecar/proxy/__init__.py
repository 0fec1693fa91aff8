"""The proxy: a listener matches a route and runs the route's stack of policy layers.

    listener.py   a traffic listener: match the route, admit, run the stack, relay the answer
    stack.py      a route's layers, built in one place, outermost first
    call.py       what flows through the layers: a `Call` in, a `Response` out
    forward.py    the innermost step: one attempt to one endpoint, counted
    endpoints.py  round robin over an upstream's endpoints, ejecting those that keep failing
"""
