"""Engines behind one small protocol, chosen by name from a registry with lazy imports."""

from meshllm.replica.engines.base import Engine, EngineSettings, TokenStream
from meshllm.replica.engines.registry import create_engine, engine_names

__all__ = ["Engine", "EngineSettings", "TokenStream", "create_engine", "engine_names"]
