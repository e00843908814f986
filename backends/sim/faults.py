"""Faults a simulated replica can suffer: a crash, a crash loop, a stall, a slowdown, a black
hole, a broken KV link."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cpsim.validation import check_choice, check_non_negative, check_positive

FaultKind = Literal["crash", "crashloop", "stall", "slowdown", "fail", "link"]
FAULT_KINDS = ("crash", "crashloop", "stall", "slowdown", "fail", "link")


@dataclass(frozen=True, slots=True)
class Fault:
    """``kind`` at ``at_s`` (simulated seconds) for ``duration_s`` (None: for good).

    crash: every request on the replica is lost (the control plane is told once, with
    ``on_instance_failure``) and the replica comes back empty after ``duration_s`` (None:
    only a restart policy brings it back, as a real engine whose process died);
    crashloop: a crash whose cause lasts ``duration_s`` (a bad node, a driver fault, an
    engine that runs out of memory as it loads): the replica goes down at ``at_s`` and each
    restart before the cause ends crashes again ``fail_after_s`` after it is up; only a
    restart policy brings it back;
    stall: no progress for ``duration_s`` (a step in flight finishes that much later;
    snapshots go on); slowdown: step times are multiplied by ``factor`` meanwhile; fail (a
    black hole): the replica stays up and healthy but fails each request submitted
    meanwhile ``fail_after_s`` after it arrives, as an engine that answers every request
    with an error at once (requests already on it go on); link: the replica's KV link is
    down, so a PD hand-off from or to it that is in flight meanwhile fails ``fail_after_s``
    after the link went down or the transfer began (the replica itself serves on)."""

    kind: FaultKind
    at_s: float
    duration_s: float | None = None
    factor: float = 1.0
    fail_after_s: float = 0.01

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, FAULT_KINDS)
        check_non_negative("at_s", self.at_s)
        if self.duration_s is not None:
            check_positive("duration_s", self.duration_s)
        check_positive("factor", self.factor)
        check_non_negative("fail_after_s", self.fail_after_s)
        if self.kind == "slowdown" and self.factor < 1.0:
            raise ValueError(f"factor={self.factor!r} is not allowed; a slowdown needs factor >= 1")

    @property
    def end_s(self) -> float:
        return float("inf") if self.duration_s is None else self.at_s + self.duration_s
