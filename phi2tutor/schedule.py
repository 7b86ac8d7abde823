"""The learning-rate factor function of TutorModule's schedule, for torch's LambdaLR: a base schedule
(transformers' warmup + cosine) held at its floor past its end, which can be told to finish sooner from a
given step (PhaseAwareLR does, when the rapid-learning phase ends). Pure Python: no torch, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SHORTENING_OUTCOMES = ("shortened", "at_floor", "left_as_is", "not_reached")
"""What PhaseAwareLR did with the schedule (run.json's ``phase_aware_lr.outcome``): shortened it; found the rate
already at its floor; left it, the decay asked for ending no sooner; or never acted, rapid learning not having
ended."""


def cosine_decay(step: int, steps: int, start: float, end: float) -> float:
    """A half cosine from ``start`` at step 0 to ``end`` at ``steps``, held at ``end`` afterwards."""
    progress = min(max(step, 0), steps) / steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ShortenableSchedule:
    """``factor(step)``: the learning rate over the peak, for ``torch.optim.lr_scheduler.LambdaLR``.

    Until ``shorten`` is called it is ``base(min(step, schedule_steps))``: the base schedule, held at its
    value at ``schedule_steps`` (its floor) afterwards. After ``shorten(at_step, steps)`` it follows the base
    up to ``at_step`` and from there a half cosine (``cosine_decay``) from the base's factor at ``at_step``
    to ``floor`` over ``steps`` steps, then stays at ``floor``: the value at ``at_step`` is unchanged, so
    the rate does not jump.

    Checkpoints. LambdaLR's ``state_dict`` saves a callable object's ``__dict__`` and its
    ``load_state_dict`` updates it, so the shortening (``tail_*``, plain numbers that ``torch.load`` with
    ``weights_only`` accepts) travels with the scheduler: a resumed run continues the shortened schedule
    whether or not the callback that shortened it is still configured. The base, its length and its floor
    live in slots, outside ``__dict__``: they are rebuilt from the run's options by ``configure_optimizers``
    as before (a function cannot go into a weights-only checkpoint).

    Args:
        base: the base factor function (transformers' warmup + cosine lambda).
        schedule_steps: the step at which the base reaches its floor.
        floor: the base's final factor (``min_lr_ratio``): where a shortened schedule ends too.
    """

    __slots__ = ("base", "schedule_steps", "floor", "__dict__")

    def __init__(self, base: Callable[[int], float], schedule_steps: int, floor: float) -> None:
        self.base = base
        self.schedule_steps = int(schedule_steps)
        self.floor = float(floor)
        self.tail_start_step: int | None = None
        self.tail_steps: int | None = None
        self.tail_start_factor: float | None = None
        self.tail_end_factor: float | None = None

    @property
    def shortened(self) -> bool:
        return self.tail_start_step is not None

    def base_factor(self, step: int) -> float:
        return float(self.base(min(step, self.schedule_steps)))

    def __call__(self, step: int) -> float:
        if self.tail_start_step is not None and step >= self.tail_start_step:
            return cosine_decay(
                step - self.tail_start_step, self.tail_steps, self.tail_start_factor, self.tail_end_factor
            )
        return self.base_factor(step)

    def steps_to_floor(self, step: int) -> int:
        """Steps the schedule still takes from ``step`` to reach its floor (0 once there)."""
        if self.tail_start_step is not None:
            return max(0, self.tail_start_step + self.tail_steps - step)
        return max(0, self.schedule_steps - step)

    def shorten(self, at_step: int, steps: int) -> None:
        """From ``at_step`` on, decay to the floor over ``steps`` steps (at least 1) instead of the base's
        remaining ``steps_to_floor(at_step)``. A schedule shortens once: a second call is an error."""
        if self.shortened:
            raise ValueError(f"the schedule was already shortened at step {self.tail_start_step}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        start_factor = self.base_factor(at_step)
        self.tail_start_step = int(at_step)
        self.tail_steps = steps
        self.tail_start_factor = start_factor
        self.tail_end_factor = self.floor
