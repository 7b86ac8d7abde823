"""The reference run (shared/reference/phi2-training-analysis.es.md) as data that tests can train on.

Its loss curve is known only by four values and a figure: a fast, near-exponential fall, then slow.
"""

from __future__ import annotations

import math

import numpy as np

REFERENCE_EPOCHS = 250
REFERENCE_LOSSES = {1: 2.6141, 50: 0.1035, 100: 0.0644, 250: 0.057}
"""The losses the analysis reports, by epoch (1-based)."""
REFERENCE_BOUNDARIES = (50, 100)
"""Last epochs of its rapid-learning and fine-tuning phases (epochs 1-50, 51-100, 101-250)."""
REFERENCE_IMPROVEMENT_PCT = (96.04, 37.78, 11.49)
"""Its "Mejora" of each phase: (start - end) / start."""
REFERENCE_TOTAL_IMPROVEMENT_PCT = 97.82

# loss(epoch) = floor + fast * exp(-(epoch - 1) / fast_time) + slow * exp(-(epoch - 1) / slow_time), solved
# so that it passes through the four reported losses; fast_time = 8 epochs is chosen, not measured.
_FLOOR = 0.056957096833910856
_FAST = 2.3339429599867865
_FAST_TIME = 8.0
_SLOW = 0.22319994317930267
_SLOW_TIME = 29.099399420672135


def reference_loss_series(noise: float = 0.0, seed: int = 0) -> list[float]:
    """The epoch train loss of the reference run, epochs 1..250 (index 0 is epoch 1).

    Args:
        noise: standard deviation of a multiplicative Gaussian noise (0.01: about 1% per epoch). With no
            noise the four reported losses are hit exactly.
        seed: the noise's seed.
    """
    losses = [
        _FLOOR + _FAST * math.exp(-(epoch - 1) / _FAST_TIME) + _SLOW * math.exp(-(epoch - 1) / _SLOW_TIME)
        for epoch in range(1, REFERENCE_EPOCHS + 1)
    ]
    for epoch, loss in REFERENCE_LOSSES.items():
        # The fitted curve matches to ~1e-16; setting the reported values makes the percentages exact.
        losses[epoch - 1] = loss
    if noise:
        factors = 1.0 + noise * np.random.default_rng(seed).standard_normal(len(losses))
        losses = [float(loss * factor) for loss, factor in zip(losses, factors)]
    return losses
