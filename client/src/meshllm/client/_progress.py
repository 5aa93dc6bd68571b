"""The batch progress bar: tqdm on stderr with rate, ETA and failures (off unless asked)."""

from __future__ import annotations

from types import TracebackType
from typing import Never

from tqdm import tqdm


class Progress:
    """``with Progress(total, enabled=...) as p: p.update(ok)``; does nothing when disabled."""

    def __init__(self, total: int | None, *, enabled: bool, unit: str = "item") -> None:
        self._bar: tqdm[Never] | None = None
        if enabled:
            self._bar = tqdm(total=total, unit=unit, dynamic_ncols=True, smoothing=0.05)
        self.failed = 0

    def update(self, ok: bool) -> None:
        if self._bar is None:
            return
        if not ok:
            self.failed += 1
            self._bar.set_postfix(failed=self.failed, refresh=False)
        self._bar.update(1)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.close()
