"""Exact group AUC (GAUC) by user over a whole split: one segmented pass, memory linear in the split.

Per user u with P_u clicks and N_u non-clicks, AUC_u is the probability that a click outscores a
non-click, ties counting 1/2 (Mann-Whitney): ``AUC_u = (R_u - P_u (P_u + 1) / 2) / (P_u N_u)`` where
R_u is the sum of the clicks' mid-ranks among the user's samples. Users with one label class (P_u = 0
or N_u = 0) have no AUC and are left out of both means, as in the released MUSE code.

- ``weighted``:   sum_u (P_u + N_u) AUC_u / sum_u (P_u + N_u), the impression-weighted mean: the paper's
  headline GAUC. The released code weights each user's AUC by its impressions too, but per batch (a user
  whose samples span two batches counts as two groups) and with ties counting 0; here the groups are the
  users of the whole split and ties count 1/2.
- ``unweighted``: the plain mean of AUC_u over users (what TorchRec's GAUCMetric reports).

The pass: sort by (user, score), number the samples within each user, give tied (user, score) runs their
mean rank, and sum per user with ``index_add``; no per-user loop and no [P, N] matrix.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class GaucResult:
    """weighted / unweighted GAUC (NaN when no user has both classes), users counted, their samples."""

    weighted: float
    unweighted: float
    users: int
    samples: int


def user_aucs(users: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact AUC of every user with both classes.

    users int [n], scores float [n] (any monotone score: logits or probabilities), labels [n] (1 = click,
    0 = not). Returns (auc float64 [U'], impressions int64 [U']) over the U' users that have both classes,
    in ascending user order.
    """
    if not (users.shape == scores.shape == labels.shape) or users.dim() != 1:
        raise ValueError(f"users, scores and labels must be equal 1-D shapes, got {list(users.shape)}, "
                         f"{list(scores.shape)}, {list(labels.shape)}")
    if users.numel() == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    users, scores, positive = users.long(), scores.double(), labels > 0.5
    by_score = torch.sort(scores, stable=True).indices
    order = by_score[torch.sort(users[by_score], stable=True).indices]  # by user, then score
    users, scores, positive = users[order], scores[order], positive[order]
    n = users.numel()
    new_user = torch.ones(n, dtype=torch.bool)
    new_user[1:] = users[1:] != users[:-1]
    new_run = new_user.clone()
    new_run[1:] |= scores[1:] != scores[:-1]
    group = torch.cumsum(new_user.long(), 0) - 1  # user group of each sample, 0..U-1
    run = torch.cumsum(new_run.long(), 0) - 1  # tied (user, score) run of each sample
    position = torch.arange(n, dtype=torch.float64)
    group_start = position[new_user]  # first sorted position of each user
    run_first = position[new_run]
    run_size = torch.bincount(run).double()
    # 1-based mid-rank of each sample within its user: the mean rank of its tied run.
    mid_rank = (run_first - group_start[group[new_run]])[run] + (run_size[run] + 1) / 2
    groups = int(group[-1]) + 1
    size = torch.bincount(group, minlength=groups)
    clicks = torch.bincount(group, weights=positive.double(), minlength=groups)
    rank_sum = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, mid_rank * positive)
    non_clicks = size.double() - clicks
    valid = (clicks > 0) & (non_clicks > 0)
    p, q = clicks[valid], non_clicks[valid]
    auc = (rank_sum[valid] - p * (p + 1) / 2) / (p * q)
    return auc, size[valid]


def gauc(users: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> GaucResult:
    """Weighted and unweighted GAUC of one process's samples (see the module docstring)."""
    auc, impressions = user_aucs(users, scores, labels)
    if auc.numel() == 0:
        return GaucResult(float("nan"), float("nan"), 0, 0)
    weights = impressions.double()
    return GaucResult(
        weighted=float((auc * weights).sum() / weights.sum()),
        unweighted=float(auc.mean()),
        users=int(auc.numel()),
        samples=int(impressions.sum()),
    )


def all_gather_variable(tensors: Sequence[torch.Tensor], group: Optional[dist.ProcessGroup] = None) -> List[torch.Tensor]:
    """Concatenate equal-length 1-D CPU tensors of every rank (lengths may differ between ranks), rank order.

    Each rank's tensors are packed as float64 columns (exact for int64 ids below 2**53 and for float32
    scores), padded to the longest rank and all-gathered once; every rank gets the same result.
    """
    world = dist.get_world_size(group)
    length = int(tensors[0].numel()) if tensors else 0
    packed = torch.stack([t.double().reshape(-1) for t in tensors], dim=1) if length else torch.zeros(0, len(tensors), dtype=torch.float64)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([length], dtype=torch.int64), group=group)
    sizes = [int(x) for x in lengths]
    longest = max(sizes)
    padded = torch.zeros(longest, len(tensors), dtype=torch.float64)
    padded[:length] = packed
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    whole = torch.cat([part[:size] for part, size in zip(parts, sizes)])
    return [whole[:, i] for i in range(len(tensors))]
