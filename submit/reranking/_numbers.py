"""The shirt-number ranking step: a torch-free change of final (Q, G) distances from each crop's read number.

Reading the numbers (a CLIP model, zero-shot) is `submit.jersey`; this step only uses them, so it runs
wherever distances are (predict, notebooks) without torch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from submit.errors import SubmitError

NO_NUMBER = -1  # the "no readable number" class


def number_agreement(dist: np.ndarray, q_numbers: Sequence[int] | np.ndarray,
                     q_probs: Sequence[float] | np.ndarray, g_numbers: Sequence[int] | np.ndarray,
                     g_probs: Sequence[float] | np.ndarray, bonus: float = 0.1, penalty: float = 0.1,
                     threshold: float = 0.5) -> np.ndarray:
    """Distances minus `bonus` where both confident numbers agree, plus `penalty` where they differ.

    A side is confident when its number is not "none" (-1) and its probability >= `threshold`; a pair
    with an unconfident side keeps its distance. Same dtype and shape as `dist`.
    """
    dist = np.asarray(dist)
    qn, qp = np.asarray(q_numbers), np.asarray(q_probs, dtype=np.float64)
    gn, gp = np.asarray(g_numbers), np.asarray(g_probs, dtype=np.float64)
    if dist.ndim != 2 or dist.shape != (len(qn), len(gn)) or len(qp) != len(qn) or len(gp) != len(gn):
        raise SubmitError(f"number_agreement: distances {dist.shape} do not fit {len(qn)} query and "
                          f"{len(gn)} gallery numbers/probabilities")
    if bonus < 0 or penalty < 0 or not 0 <= threshold <= 1:
        raise SubmitError(f"jersey: bonus and penalty must be >= 0 and threshold in [0, 1] "
                          f"(got {bonus}, {penalty}, {threshold})")
    q_ok = (qn != NO_NUMBER) & (qp >= threshold)
    g_ok = (gn != NO_NUMBER) & (gp >= threshold)
    both = q_ok[:, None] & g_ok[None, :]
    same = qn[:, None] == gn[None, :]
    shift = np.where(both & same, -bonus, 0.0) + np.where(both & ~same, penalty, 0.0)
    return (dist + shift).astype(dist.dtype, copy=False)
