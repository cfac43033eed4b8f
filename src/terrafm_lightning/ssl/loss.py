"""DINO cross-entropy between teacher global crops and student crops of other views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dino_loss(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """Mean cross-entropy H(p_t_i, p_s_j) over pairs (teacher global i, student crop j != i).

    Student crops are ordered globals first, so student crop ``i`` is the same view as teacher
    crop ``i`` and that pair is skipped.

    Args:
        student_logits: (n_student_crops, B, K) raw student head outputs.
        teacher_probs: (n_global, B, K) centred, sharpened teacher probabilities.
        student_temp: student softmax temperature (0.1 in DINO).

    Returns:
        Scalar loss: per pair the batch mean, then the mean over pairs.
    """
    n_global, n_student = teacher_probs.shape[0], student_logits.shape[0]
    if n_student < 2 or n_global > n_student:
        raise ValueError(
            f"need at least 2 student crops and no more teacher crops ({n_global}) than student "
            f"crops ({n_student})"
        )
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    # (n_global, n_student) matrix of batch-mean cross-entropies.
    pairs = -torch.einsum("ibk,jbk->ij", teacher_probs.float(), log_p) / log_p.shape[1]
    # Sum minus the same-view diagonal: no boolean-mask indexing (a host sync on a GPU).
    return (pairs.sum() - pairs.diagonal().sum()) / (pairs.numel() - n_global)
