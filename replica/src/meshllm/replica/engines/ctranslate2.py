"""CTranslate2 engine (CPU and CUDA) on the shared micro-batcher.

CTranslate2 has no continuous batching, so each batch is one ``generate_batch`` call with a
per-token callback. The callback runs on a CTranslate2 thread holding the GIL: it only hands
the token to the request's TokenStream and returns True to stop that one item (cancelled,
or its own ``max_tokens`` reached); the other items of the batch go on.
"""

from __future__ import annotations

import os
from typing import Any

import ctranslate2

from meshllm.api.errors import FailedPrecondition, FieldViolation, InvalidArgument
from meshllm.replica.engines.base import EngineSettings
from meshllm.replica.engines.batching import BatchingEngine, Work


def parse_device(device: str) -> tuple[str, int]:
    """``cpu`` -> ("cpu", 0); ``cuda:1`` -> ("cuda", 1)."""
    kind, _, index = device.partition(":")
    return kind, int(index or 0)


def check_device(device: str, compute_type: str) -> None:
    """Clear errors before CTranslate2's own (a CUDA driver message, or a ValueError)."""
    kind, index = parse_device(device)
    if kind == "cuda" and index >= (count := ctranslate2.get_cuda_device_count()):
        raise FailedPrecondition(
            f"device {device!r} is not visible to CTranslate2 ({count} CUDA devices)",
            reason="DEVICE_UNAVAILABLE",
        )
    if compute_type in ("", "default", "auto"):
        return
    supported = sorted(ctranslate2.get_supported_compute_types(kind, index))
    if compute_type not in supported:
        message = (
            f"{compute_type!r} is not supported on {device}; supported: {', '.join(supported)}"
        )
        raise InvalidArgument(
            f"compute_type: {message}", field_violations=[FieldViolation("compute_type", message)]
        )


def ct2_seed(seed: int) -> int:
    """A request's uint64 seed as CTranslate2's 32-bit one: the two halves folded together, so
    seeds that differ only in their high bits still differ.

    What the seed does on CTranslate2 4.8: each worker thread keeps one random generator, seeded
    from the process-wide seed the first time that thread samples; ``set_random_seed`` later
    changes only threads that have not sampled yet. So a seed makes a reply reproducible only
    for the first sampled batch each worker thread runs after the model loads (docs/engines.md).
    """
    return (seed ^ (seed >> 32)) & 0xFFFF_FFFF


class CTranslate2Engine(BatchingEngine):
    name = "ctranslate2"

    def __init__(self, settings: EngineSettings) -> None:
        check_device(settings.device, settings.compute_type)
        kind, index = parse_device(settings.device)
        cores = os.cpu_count() or 1
        workers = settings.inter_threads or (min(2, cores) if kind == "cpu" else 2)
        intra = settings.intra_threads or (max(1, cores // workers) if kind == "cpu" else 1)
        super().__init__(settings, workers=workers, max_batch_size=settings.max_batch_size or 32)
        self._vocab = settings.vocabulary
        self._generator: Any = ctranslate2.Generator(
            str(settings.model_dir),
            device=kind,
            device_index=index,
            compute_type=settings.compute_type or "default",
            inter_threads=workers,
            intra_threads=intra,
            max_queued_batches=-1,  # admission control is ours; a full CT2 queue would block
        )

    def run_batch(self, batch: list[Work]) -> None:
        sampling = batch[0].sampling  # all items share the batch key
        streams = [w.stream for w in batch]

        def on_token(step: Any) -> bool:
            return streams[int(step.batch_id)].push(int(step.token_id))

        if sampling.seed is not None:
            ctranslate2.set_random_seed(ct2_seed(sampling.seed))
        vocab = self._vocab
        self._generator.generate_batch(
            [[vocab[i] for i in w.prompt_ids] for w in batch],
            max_length=max(w.sampling.max_tokens for w in batch),
            include_prompt_in_result=False,
            beam_size=1,
            sampling_topk=1 if sampling.greedy else sampling.top_k,
            sampling_topp=sampling.top_p,
            sampling_temperature=1.0 if sampling.greedy else sampling.temperature,
            repetition_penalty=sampling.repetition_penalty,
            callback=on_token,
        )

    def release(self) -> None:
        # A Generator alive at interpreter exit can abort the process: free it explicitly.
        generator, self._generator = self._generator, None
        if generator is not None:
            generator.unload_model()
            del generator
