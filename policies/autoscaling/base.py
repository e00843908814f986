"""What the autoscalers share: the scale-in stabilization window."""

from __future__ import annotations

from collections import deque

from cpsim.validation import check_non_negative


class StabilizedTarget:
    """Scale in only to the highest target of the last ``window_s`` (Kubernetes HPA's
    downscale stabilization): a dip shorter than the window removes nothing, so the pool
    does not flap; scaling out is never delayed. The pool's size when first seen counts as
    a target, so nothing is removed in the first window."""

    def __init__(self, window_s: float) -> None:
        check_non_negative("window_s", window_s)
        self.window_s = window_s
        self._history: deque[tuple[float, int]] = deque()

    def __call__(self, desired: int, current: int, now: float) -> int:
        if self.window_s == 0.0:
            return desired
        if not self._history:  # the pool as it starts counts as a recommendation of its own
            self._history.append((now, current))
        self._history.append((now, desired))
        while self._history and self._history[0][0] < now - self.window_s:
            self._history.popleft()
        if desired >= current:
            return desired
        return min(current, max(d for _, d in self._history))
