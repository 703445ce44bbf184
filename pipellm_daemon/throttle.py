"""How far each learned predictor may speculate, from how much of what it made ahead was used lately.

Declared sources (intents, swap) are the serving code's own word and keep the full depth: a replaced hint
costs only the ciphertext it wasted (the pipeline burns what it no longer names). A learned guess (a cycle,
adapter popularity) that keeps being thrown away costs encryption the on-demand work needs, so a learned
source whose recent share of used bytes falls below one half speculates one chunk at a time: enough to
notice when its guesses land again. The share is read from the per-source counters, never kept apart.
"""

from __future__ import annotations

from typing import Final

from .counters import Counters

LEARNED: Final = ("cycle", "lora")
KEEP: Final = 0.5  # weight of the old share at each update (a wasteful spell fades in a few refills)
TRUSTED: Final = 0.5  # a share of used bytes below this throttles the source


class SourceThrottle:
    def __init__(self, counters: Counters) -> None:
        self._counters = counters
        self._seen = {src: (0, 0) for src in LEARNED}
        self.share = dict.fromkeys(LEARNED, 1.0)  # every source starts trusted

    def update(self) -> None:
        """Fold what each learned source's ciphertext came to since the last update into its share."""
        for src in LEARNED:
            used, wasted = self._counters.bytes_of(src, "used"), self._counters.bytes_of(src, "wasted")
            last_used, last_wasted = self._seen[src]
            du, dw = used - last_used, wasted - last_wasted
            if du + dw:
                self.share[src] = KEEP * self.share[src] + (1 - KEEP) * du / (du + dw)
                self._seen[src] = (used, wasted)

    def depth(self, source: str, depth: int) -> int:
        """The depth `source` may speculate to, given the pipeline's learned `depth`."""
        return depth if self.share.get(source, 1.0) >= TRUSTED else min(depth, 1)
