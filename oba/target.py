r"""The target of structured pruning and its schedule: :class:`PruningTarget`.

The target :math:`r` is the fraction of MACs (``kind="flops"``), parameters (``"params"``) or prunable channels
(``"channels"``) **kept**, measured against the model as given or a ``reference`` (the dense model, when the
model was pruned before or is rewritten before pruning). It is reached in ``steps`` steps with per-step targets
:math:`r_s = r^{s/S}` (``schedule="exponential"``) or :math:`r_s = 1 - (1 - r)\,s/S` (``"linear"``),
:math:`s = 1..S`, or at explicit ``step_targets`` (non-increasing, the last one :math:`r`). Kept apart from the
pruner, as Torch-Pruning keeps its scheduler apart from its pruners.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["KINDS", "PruningTarget", "TargetNotReachedError"]

KINDS = ("flops", "params", "channels")
SCHEDULES = ("exponential", "linear")


class TargetNotReachedError(RuntimeError):
    """The pruning target cannot be reached; ``reached`` is the fraction kept when pruning stopped."""

    def __init__(self, message: str, reached: float, history: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.reached = reached
        self.history = history


@dataclass(frozen=True)
class PruningTarget:
    """What to keep (``kind``, ``keep``) and the per-step targets on the way (:meth:`step_targets`)."""

    kind: str
    keep: float
    steps: int = 1
    schedule: str = "exponential"
    explicit: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"the target kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, numbers.Real):
            raise TypeError(f"keep_{self.kind} must be a number (the fraction KEPT, in (0, 1]), got {self.keep!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise TypeError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep_{self.kind} is the fraction KEPT and must be in (0, 1], got {self.keep}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be 'exponential' or 'linear', got {self.schedule!r}")
        if self.explicit is not None:
            t = self.explicit
            increasing = any(b > a for a, b in zip(t, t[1:], strict=False))
            if not t or t[-1] != self.keep or increasing:
                raise ValueError(
                    f"step_targets must be non-increasing and end at keep_{self.kind}={self.keep}, got {list(t)}"
                )

    @classmethod
    def from_arguments(
        cls,
        keep_flops: float | None = None,
        keep_params: float | None = None,
        keep_channels: float | None = None,
        *,
        steps: int = 1,
        schedule: str = "exponential",
        step_targets: Sequence[float] | None = None,
    ) -> PruningTarget:
        """The target of :func:`oba.prune_structured`'s arguments: exactly one of the three ``keep_*``."""
        given = {k: v for k, v in zip(KINDS, (keep_flops, keep_params, keep_channels), strict=True) if v is not None}
        if len(given) != 1:
            raise ValueError("give exactly one target: keep_flops, keep_params or keep_channels (fractions kept)")
        ((kind, keep),) = given.items()
        explicit = None if step_targets is None else tuple(float(t) for t in step_targets)
        return cls(kind, keep, steps, schedule, explicit)

    def step_targets(self) -> list[float]:
        """The fraction to keep after each step, the last one :attr:`keep`."""
        if self.explicit is not None:
            return list(self.explicit)
        s_total = self.steps
        if self.schedule == "exponential":
            return [self.keep ** (s / s_total) for s in range(1, s_total + 1)]
        return [1 - (1 - self.keep) * s / s_total for s in range(1, s_total + 1)]
