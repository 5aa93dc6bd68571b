"""Engine registry: name -> factory. Factories import their engine library lazily."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from meshllm.api.errors import FailedPrecondition, InvalidArgument
from meshllm.replica.engines.base import Engine, EngineSettings

EngineFactory = Callable[[EngineSettings], Engine]


def _ctranslate2(settings: EngineSettings) -> Engine:
    try:
        from meshllm.replica.engines.ctranslate2 import CTranslate2Engine
    except ImportError as e:
        raise _missing("ctranslate2", "meshllm-replica[ctranslate2]", e) from e
    return CTranslate2Engine(settings)


def _exllamav3(settings: EngineSettings) -> Engine:
    from meshllm.replica.engines.exllamav3_jobs import parse_options

    options = parse_options(settings)  # device and options are checked before the heavy import
    try:
        module = importlib.import_module("meshllm.replica.engines.exllamav3")
    except ImportError as e:
        raise _missing("exllamav3", "meshllm-replica[exllamav3]", e) from e
    engine: Engine = module.ExLlamaV3Engine(settings, options)
    return engine


def _fake(settings: EngineSettings) -> Engine:
    from meshllm.replica.engines.fake import FakeEngine

    return FakeEngine(settings)


def _sim(settings: EngineSettings) -> Engine:
    from meshllm.replica.engines.sim import SimEngine

    return SimEngine(settings)


_REGISTRY: dict[str, EngineFactory] = {
    "ctranslate2": _ctranslate2,
    "exllamav3": _exllamav3,
    "fake": _fake,
    "sim": _sim,
}


def engine_names() -> list[str]:
    return sorted(_REGISTRY)


def create_engine(name: str, settings: EngineSettings) -> Engine:
    """Build the named engine; unknown names and missing libraries are clear errors."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise InvalidArgument(
            f"unknown engine {name!r}; known engines: {', '.join(engine_names())}"
        )
    return factory(settings)


def _missing(engine: str, extra: str, error: ImportError) -> FailedPrecondition:
    return FailedPrecondition(
        f"engine {engine!r} is selected but its library is not installed ({error}); "
        f"install it with: pip install '{extra}' (from a checkout: pip install "
        f"'./replica[{extra.partition('[')[2]}')",
        reason="ENGINE_NOT_INSTALLED",
    )
