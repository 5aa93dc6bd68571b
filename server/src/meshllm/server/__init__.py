"""Code only servers need: the serving lifecycle, Prometheus metrics, request logs and tracing
setup shared by the router and the replica (clients never install it)."""
