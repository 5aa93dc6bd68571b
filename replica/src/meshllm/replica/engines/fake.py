"""FakeEngine: a deterministic test double, selected only by name (engine ``fake``).

It echoes the prompt's token ids (skipping end-of-sequence ids), one per ``token_delay_ms``
(option, default 1), through the same micro-batcher as the real engines, so tests of routing,
cancellation and streaming can use exact expected outputs and a chosen speed.
"""

from __future__ import annotations

import time

from meshllm.replica.engines.base import EngineSettings
from meshllm.replica.engines.batching import BatchingEngine, Work


class FakeEngine(BatchingEngine):
    name = "fake"

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(
            settings,
            workers=settings.inter_threads or 2,
            max_batch_size=settings.max_batch_size or 32,
        )
        self.token_delay_s = float(settings.options.get("token_delay_ms", "1")) / 1000.0

    def run_batch(self, batch: list[Work]) -> None:
        sources = [
            [t for t in w.prompt_ids if t not in self.settings.eos_ids] or [0] for w in batch
        ]
        active = set(range(len(batch)))
        step = 0
        while active:
            time.sleep(self.token_delay_s)
            for i in sorted(active):
                src = sources[i]
                if batch[i].stream.push(src[step % len(src)]):
                    active.discard(i)
            step += 1
