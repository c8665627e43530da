"""
Instrumentation events: one event per proxied request (L{schema}), token
usage read or estimated on the way (L{usage}), the buses that carry events
(L{memory}, L{redis_streams}), the proxy's publisher and the dispatcher
that delivers them to files and observability services.
"""
