"""Stop strings over streamed text: emit what cannot start a stop string, hold back the rest."""

from __future__ import annotations


class StopMatcher:
    """Finds the first stop string in text that arrives in pieces.

    Text that might be the beginning of a stop string is held back until the next piece decides,
    so a stop string split across chunks is still caught and never partly sent.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.matched = ""

    def feed(self, text: str) -> str:
        """Add text; return the part that is safe to send. After a match, returns ''."""
        if self.matched:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        hit = min(
            ((buf.find(s), s) for s in self._stops if s in buf), default=None, key=lambda t: t[0]
        )
        if hit is not None:
            self.matched = hit[1]
            self._held = ""
            return buf[: hit[0]]
        keep = self._longest_stop_prefix_suffix(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation: release the held text (it did not become a stop string)."""
        held, self._held = self._held, ""
        return "" if self.matched else held

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
