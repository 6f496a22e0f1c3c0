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
mean rank, and sum per user with ``index_add``; no per-user loop and no [P, N] matrix. Across ranks
(``distributed_gauc``) the samples are exchanged by user, so no rank holds more than its share.
"""

from dataclasses import dataclass
from typing import Optional

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


def distributed_gauc(users: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                     group: Optional[dist.ProcessGroup] = None) -> GaucResult:
    """GAUC over every rank's samples (collective; every rank gets the same result).

    users int [n], scores float [n], labels [n]: this rank's samples (n may differ between ranks, a user's
    samples may be on several). Each sample goes to rank ``user mod world`` in one ``all_to_all`` (packed as
    float64 columns: exact for ids below 2**53 and for float32 scores), so every user's samples meet on one
    rank; each rank takes its users' exact AUCs (``user_aucs``) and four sums (weighted AUC, impressions, AUC,
    users) are all-reduced. Traffic and memory per rank are its own share of the split, not the whole split.
    Equal to ``gauc`` of the concatenated split up to float64 summation order.
    """
    world = dist.get_world_size(group)
    if world == 1:
        return gauc(users, scores, labels)
    if not (users.shape == scores.shape == labels.shape) or users.dim() != 1:
        raise ValueError(f"users, scores and labels must be equal 1-D shapes, got {list(users.shape)}, "
                         f"{list(scores.shape)}, {list(labels.shape)}")
    destination = torch.remainder(users.long(), world)
    order = torch.argsort(destination, stable=True)
    packed = torch.stack([users.double(), scores.double(), labels.double()], dim=1)[order]
    send = torch.bincount(destination, minlength=world)
    receive = torch.empty_like(send)
    dist.all_to_all_single(receive, send, group=group)
    mine = torch.empty(int(receive.sum()), 3, dtype=torch.float64)
    dist.all_to_all_single(mine, packed, output_split_sizes=receive.tolist(), input_split_sizes=send.tolist(),
                           group=group)
    auc, impressions = user_aucs(mine[:, 0].long(), mine[:, 1], mine[:, 2])
    weights = impressions.double()
    sums = torch.stack([(auc * weights).sum(), weights.sum(), auc.sum(),
                        torch.tensor(float(auc.numel()), dtype=torch.float64)])
    dist.all_reduce(sums, group=group)
    weighted_sum, samples, auc_sum, count = sums.tolist()
    if count == 0:
        return GaucResult(float("nan"), float("nan"), 0, 0)
    return GaucResult(weighted=weighted_sum / samples, unweighted=auc_sum / count, users=int(count),
                      samples=int(samples))
