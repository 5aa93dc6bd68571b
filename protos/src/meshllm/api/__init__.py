"""meshllm's wire contract: generated protobuf code in ``meshllm.api.v1`` and the error model."""
