"""meshllm router: one Generation endpoint in front of many replicas (see issue: router)."""
