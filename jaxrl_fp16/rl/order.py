"""The order in which a run visits its data: successive slices of per-epoch permutations (a pure function)."""

from __future__ import annotations

import numpy as np

__all__ = ["epoch_slice"]


def epoch_slice(n: int, size: int, step: int, seed: int) -> np.ndarray:
    """Indices into `n` items of step `step`: positions [step * size, (step + 1) * size) of the endless sequence
    that concatenates one permutation of range(n) per epoch, epoch e permuted by `default_rng([seed, e])`.

    A function of its arguments alone, so a resumed run continues where it stopped. The RL trainer takes each
    iteration's prompts this way, the DPO trainer each optimizer step's pairs."""
    if n < 1 or size < 0 or step < 0:
        raise ValueError(f"epoch_slice: n={n} must be >= 1, size={size} and step={step} >= 0")
    epochs, offsets = np.divmod(np.arange(step * size, (step + 1) * size), n)
    perms = {int(e): np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
    return np.asarray([perms[int(e)][o] for e, o in zip(epochs, offsets)], dtype=np.int64)
