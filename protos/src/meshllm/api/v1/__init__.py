"""Generated from protos/meshllm/api/v1/*.proto by protos/generate.py; never edit by hand."""
