"""ExLlamaV3 engine (CUDA only): continuous batching on one GPU.

Loads a model folder (EXL3-quantized, or an unquantized FP16 Hugging Face folder) with a paged KV
cache of ``cache_size`` tokens, FP16 or quantized (``cache_quant``), and runs ExLlamaV3's
synchronous ``Generator.iterate()`` loop on a thread of its own (``exllamav3_loop.py``). This
module imports torch and exllamav3 at the top: the registry imports it only when the engine is
selected, and a missing library becomes a clear FAILED load (``ENGINE_NOT_INSTALLED``).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch
from exllamav3 import (
    Cache,
    CacheLayer_quant,
    ComboSampler,
    Config,
    Generator,
    Job,
    Model,
    Tokenizer,
)

from meshllm.api.errors import FailedPrecondition
from meshllm.replica.engines.base import EngineSettings
from meshllm.replica.engines.exllamav3_jobs import ExLlamaV3Options, JobSpec, parse_options
from meshllm.replica.engines.exllamav3_loop import GeneratorLoop

log = logging.getLogger(__name__)


class ExLlamaV3Engine(GeneratorLoop):
    name = "exllamav3"

    def __init__(self, settings: EngineSettings, options: ExLlamaV3Options | None = None) -> None:
        opts = options or parse_options(settings)
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if opts.device_index >= visible:
            raise FailedPrecondition(
                f"device {settings.device!r} is not visible to torch ({visible} CUDA devices)",
                reason="DEVICE_UNAVAILABLE",
            )
        self._device = torch.device("cuda", opts.device_index)
        config = Config.from_directory(str(settings.model_dir))
        self._model: Any = Model.from_config(config)
        self._cache: Any = Cache(
            self._model, max_num_tokens=opts.cache_tokens, **_cache_layer(opts)
        )
        try:
            self._model.load(device=self._device)
            self._generator_obj: Any = Generator(
                model=self._model,
                cache=self._cache,
                tokenizer=Tokenizer.from_config(config),
                max_batch_size=opts.max_jobs,
                max_chunk_size=opts.max_chunk_size,
            )
        except BaseException:
            self.release()
            raise
        log.info(
            "exllamav3: %s on %s, cache %d tokens (%s)",
            settings.model_dir,
            self._device,
            opts.cache_tokens,
            f"K{opts.cache_bits[0]}V{opts.cache_bits[1]}" if opts.cache_bits else "FP16",
        )
        super().__init__(
            settings,
            self._generator_obj,
            _make_job,
            max_jobs=opts.max_jobs,
            cache_pages=self._cache_pages,
        )

    def prepare_thread(self) -> None:
        torch.cuda.set_device(self._device)  # the current device is per thread in torch

    def _cache_pages(self) -> tuple[int, int]:
        table = self._generator_obj.pagetable
        total = int(table.max_pages)
        return total - int(table.num_unreferenced_pages()), total

    def release(self) -> None:
        model, self._model = getattr(self, "_model", None), None
        self._generator_obj = self._cache = None
        if model is not None:
            model.unload()  # frees the weights and the cache tensors attached to the model
        del model
        gc.collect()
        torch.cuda.empty_cache()


def _cache_layer(opts: ExLlamaV3Options) -> dict[str, Any]:
    if opts.cache_bits is None:
        return {}
    k_bits, v_bits = opts.cache_bits
    return {"layer_type": CacheLayer_quant, "k_bits": k_bits, "v_bits": v_bits}


def _make_job(spec: JobSpec) -> Any:
    s = spec.sampler
    return Job(
        input_ids=torch.tensor([spec.input_ids], dtype=torch.long),
        max_new_tokens=spec.max_new_tokens,
        stop_conditions=list(spec.stop_conditions),
        seed=spec.seed,
        identifier=spec.identifier,
        sampler=ComboSampler(
            rep_p=s.repetition_penalty, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p
        ),
    )
