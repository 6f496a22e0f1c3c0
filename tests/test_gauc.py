"""training.gauc against a brute-force pairwise reference: ties, single-class users, weighted vs unweighted,
and the variable-size gather across two gloo ranks."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.gauc import distributed_gauc, gauc, user_aucs


def _pairwise_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    return float(wins.mean())


def _reference(users, scores, labels):
    """(weighted, unweighted, users) by a loop over users and all their click/non-click pairs."""
    aucs, weights = [], []
    for u in users.unique():
        mine = users == u
        clicks = int(labels[mine].sum())
        if 0 < clicks < int(mine.sum()):
            aucs.append(_pairwise_auc(scores[mine], labels[mine]))
            weights.append(int(mine.sum()))
    weighted = sum(a * w for a, w in zip(aucs, weights)) / sum(weights)
    return weighted, sum(aucs) / len(aucs), len(aucs)


def _random_split(n: int, users: int, seed: int, levels: int = 0):
    """users int64 [n], scores float32 [n] (rounded to ``levels`` values when > 0, which makes many ties),
    labels float32 [n]; user sizes are skewed so weighted and unweighted differ."""
    g = torch.Generator().manual_seed(seed)
    user = (torch.rand(n, generator=g) ** 3 * users).long()
    labels = (torch.rand(n, generator=g) < 0.3).float()
    # The signal grows with the user index: heavy (small-index) users are harder, so the means differ.
    scores = torch.randn(n, generator=g) + labels * (user.float() / users) * 3
    if levels:
        scores = torch.round(scores * levels / 4) / (levels / 4)
    return user, scores.float(), labels


@pytest.mark.parametrize("levels", [0, 8])
def test_gauc_matches_brute_force(levels):
    users, scores, labels = _random_split(3000, 60, seed=levels, levels=levels)
    got = gauc(users, scores, labels)
    weighted, unweighted, counted = _reference(users, scores, labels)
    assert got.weighted == pytest.approx(weighted, abs=1e-12)
    assert got.unweighted == pytest.approx(unweighted, abs=1e-12)
    assert got.users == counted
    assert abs(got.weighted - got.unweighted) > 0.01, "the skewed split must tell the two means apart"


def test_ties_count_half_and_single_class_users_are_left_out():
    users = torch.tensor([7, 7, 7, 7, 3, 3, 3, 9, 9, 5])
    scores = torch.tensor([0.2, 0.2, 0.5, 0.1, 0.4, 0.4, 0.4, 0.9, 0.1, 0.3])
    labels = torch.tensor([1, 0, 1, 0, 1, 1, 1, 0, 0, 1.0])  # users 3, 9 and 5 have one class
    auc, impressions = user_aucs(users, scores, labels)
    # user 7: clicks {0.2, 0.5}, non-clicks {0.2, 0.1}: pairs 0.5 (tie), 1, 1, 1 -> 3.5 / 4.
    assert auc.tolist() == [0.875] and impressions.tolist() == [4]
    result = gauc(users, scores, labels)
    assert (result.weighted, result.unweighted, result.users, result.samples) == (0.875, 0.875, 1, 4)


def test_all_tied_user_scores_one_half_and_order_does_not_matter():
    users = torch.tensor([1, 2, 1, 2, 1, 2, 2])
    scores = torch.tensor([0.3, 0.1, 0.3, 0.9, 0.3, 0.5, 0.2])
    labels = torch.tensor([1, 1, 0, 0, 0, 1, 0.0])
    # user 1 all tied -> 0.5 (3 samples); user 2: clicks {0.1, 0.5} vs non-clicks {0.9, 0.2} -> 1/4 (4 samples).
    result = gauc(users, scores, labels)
    assert result.unweighted == pytest.approx((0.5 + 0.25) / 2)
    assert result.weighted == pytest.approx((0.5 * 3 + 0.25 * 4) / 7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert gauc(users[perm], scores[perm], labels[perm]) == result


def test_no_user_with_both_classes_is_nan_and_bad_shapes_are_refused():
    result = gauc(torch.tensor([1, 1, 2]), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1.0, 1.0, 0.0]))
    assert result.users == 0 and result.weighted != result.weighted
    assert gauc(torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0)).users == 0
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        gauc(torch.tensor([1, 2]), torch.tensor([0.1]), torch.tensor([1.0, 0.0]))


def _gauc_rank(rank: int, port: int, parts, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        users, scores, labels = parts[rank]
        result = distributed_gauc(users, scores, labels)
        empty = distributed_gauc(users[:0], scores[:0], labels[:0])  # no samples anywhere
        torch.save({"result": result.__dict__, "empty": empty.__dict__}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_of_unequal_size_give_the_gauc_of_the_whole_split(tmp_path):
    users, scores, labels = _random_split(700, 30, seed=5, levels=8)
    cut = 450  # rank 0 holds 450 rows, rank 1 holds 250; users span both ranks
    parts = [(users[:cut], scores[:cut], labels[:cut]), (users[cut:], scores[cut:], labels[cut:])]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gauc_rank, args=(port, parts, str(tmp_path)), nprocs=2, join=True)
    want = gauc(users, scores, labels)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        got = saved["result"]
        assert (got["users"], got["samples"]) == (want.users, want.samples)
        # the same per-user AUCs, summed in another order: equal to float64 rounding
        assert got["weighted"] == pytest.approx(want.weighted, rel=1e-12, abs=0)
        assert got["unweighted"] == pytest.approx(want.unweighted, rel=1e-12, abs=0)
        assert saved["empty"]["users"] == 0 and math.isnan(saved["empty"]["weighted"])
