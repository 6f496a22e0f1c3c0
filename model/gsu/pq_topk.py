"""``pq_topk``: the approximate GSU, the top-K history behaviors of each target by product-quantized cosine
(``model.gsu.pq``), optionally re-scored exactly; the same output contract as ``cosine_topk``.

Per target t, a lookup table LUT[m, c] = <t_m / |t|, centroid[m, c]> (M x C floats); a behavior's estimated
cosine is the sum of its M codes' entries, so a history is scored by reading M bytes per behavior instead of its
D-value row. The sums run as one ``embedding_bag`` (mode "sum") over the codes offset into the lookup tables:
samples that share a history (the same user, identical rows of ``history_ids``) read its codes once for all of
their targets (the bag's weight then has one column per target). Estimates are clamped to [-1, 1]; zero rows
(padding, items without content) are coded as the zero centroid and score exactly 0; padding (item 0) is never
selected.

The history is streamed in pieces of positions; a running top-K' per sample (int64 rank keys, ``model.gsu.ranking``:
score, then the larger position first) keeps memory bounded by the piece. With ``candidates`` K' > 0, the K'
best by estimate get their exact cosine from the real table (``pair_cosine``, bit-identical to ``cosine_topk``'s)
and the top K of those are returned with exact scores; with 0, the top K by estimate, with estimated scores.
"""

from typing import Dict, List, Optional, Tuple

import torch

from model.gsu import kernels
from model.gsu.cosine import cosines, pair_cosine
from model.gsu.inputs import check_inputs, chunk_rows_for, norms_for
from model.gsu.pq import PQIndex, unit_rows
from model.gsu.ranking import NO_KEY, RunningTopK, rank_keys
from model.gsu.table import RowNorms
from model.gsu.topk import history_groups


def pq_topk(
    index: PQIndex,
    table: torch.Tensor,
    target_ids: torch.Tensor,
    history_ids: torch.Tensor,
    k: int,
    candidates: int = 0,
    norms: Optional[RowNorms] = None,
    chunk_rows: Optional[int] = None,
    share_histories: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-``k`` history behaviors of each sample by cosine with its target.

    index:       ``PQIndex`` of ``table`` (codes [N, M] for the same N rows).
    table:       [N, D] int8 / bfloat16 / float32, row 0 padding: read for the B targets and, with ``candidates``,
                 the B x K' re-scored rows only.
    target_ids:  int64 [B]; history_ids: int64 [B, L], 0 = padding; 1 <= k <= L.
    candidates:  K' >= k behaviors re-scored exactly (capped at L); 0: no re-scoring.
    norms:       optional ``RowNorms`` of ``table`` (computed and cached otherwise).
    chunk_rows:  (history, position) pairs scored per step (default ``DEFAULT_CHUNK_ROWS``).
    share_histories: score identical history rows once for all their samples.

    Returns ``scores`` float32 [B, k] (exact cosines with re-scoring, estimates otherwise), descending among valid
    slots, ties: larger position first; ``positions`` int64 [B, k]; ``valid`` bool [B, k], False past the sample's
    non-padding behaviors (score 0, position 0).
    """
    check_inputs(table, target_ids, history_ids, k)
    if index.num_rows != table.shape[0] or index.dim != table.shape[1]:
        raise ValueError(f"index: codes of {index.num_rows} rows x D = {index.dim} for a table of {tuple(table.shape)}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or (candidates and candidates < k):
        raise ValueError(f"candidates: must be 0 or an int >= k = {k}, got {candidates!r}")
    chunk_rows = chunk_rows_for(table, chunk_rows)
    norms = norms_for(table, norms)
    length = history_ids.shape[1]
    width = min(candidates, length) if candidates else k
    luts = lookup_tables(index, table, norms, target_ids)  # [B, M * C]
    groups = history_groups(history_ids) if share_histories else [[b] for b in range(history_ids.shape[0])]
    state = RunningTopK(history_ids.shape[0], width)
    taus = torch.full((history_ids.shape[0],), float("-inf"))  # score of each sample's K'-th key (-inf: not full)
    for size, members in _by_size(groups).items():
        _score_groups(index, luts, history_ids, members, size, state, taus, chunk_rows)
    if not candidates:
        return state.result()
    return _rescore(table, norms, target_ids, history_ids, state, k)


def lookup_tables(index: PQIndex, table: torch.Tensor, norms: RowNorms, target_ids: torch.Tensor) -> torch.Tensor:
    """float32 [B, M * C]: entry (m, c) of row b is <t_b,m / |t_b|, centroid[m, c]> (0 for a zero target)."""
    m, c, _ = index.codebooks.shape
    units = unit_rows(table.index_select(0, target_ids), norms.sq_norm.index_select(0, target_ids))
    parts = units.view(units.shape[0], m, -1)  # [B, M, d]
    return torch.einsum("bmd,mcd->bmc", parts, index.codebooks).reshape(units.shape[0], m * c).contiguous()


def _by_size(groups: List[List[int]]) -> Dict[int, List[List[int]]]:
    """Groups of samples sharing a history, bucketed by their size (one bag weight layout per size)."""
    out: Dict[int, List[List[int]]] = {}
    for members in groups:
        out.setdefault(len(members), []).append(members)
    return out


def _score_groups(index: PQIndex, luts: torch.Tensor, history_ids: torch.Tensor, groups: List[List[int]], size: int,
                  state: RunningTopK, taus: torch.Tensor, chunk_rows: int) -> None:
    """Stream the histories of ``groups`` (each ``size`` samples sharing one history row) into ``state``.

    The bag weight is [groups * M * C, size]: row (g, m, c) holds LUT[m, c] of group g's ``size`` targets, so one
    bag of M codes (offset by m * C + g * M * C) sums a behavior's estimate for all of its group's targets at once.
    Groups are taken a batch at a time so each piece holds about ``chunk_rows`` (history, position) pairs. Only
    estimates at or above a sample's running K'-th score (``taus``) become rank keys and are merged.
    """
    m, c, _ = index.codebooks.shape
    length = history_ids.shape[1]
    sub = torch.arange(m, dtype=torch.int32) * c  # int32 bag indices: 5x cheaper to form than int64
    per_batch = max(1, min(len(groups), chunk_rows // min(length, chunk_rows)))
    for g0 in range(0, len(groups), per_batch):
        batch = groups[g0:g0 + per_batch]
        members = torch.tensor(batch, dtype=torch.int64)  # [g, size]
        g = members.shape[0]
        reps = history_ids.index_select(0, members[:, 0])  # [g, L]
        # written into fresh row-major storage: a [n, 1] view with strides (1, n) sends embedding_bag down a ~50x slower path
        weight = torch.empty(g * m * c, size, dtype=torch.float32)
        weight.view(g, m * c, size).copy_(luts.index_select(0, members.reshape(-1)).view(g, size, m * c).transpose(1, 2))
        step = max(1, chunk_rows // g)
        base = (torch.arange(g, dtype=torch.int32) * (m * c))[:, None, None] + sub  # [g, 1, M]
        samples = members.reshape(-1)
        for lo in range(0, length, step):
            ids = reps[:, lo:lo + step]  # [g, w]
            w = ids.shape[1]
            codes = index.codes.index_select(0, ids.reshape(-1)).view(g, w, m)
            bags = (codes.to(torch.int32) + base).view(g * w, m)
            est = torch.nn.functional.embedding_bag(bags, weight, mode="sum").view(g, w, size)
            est = est.clamp(-1.0, 1.0).permute(0, 2, 1).reshape(g * size, w) + 0.0  # [samples, w]; + 0.0: no -0.0 keys
            pad = ids == 0 if size == 1 else (ids == 0).repeat_interleave(size, dim=0)
            rows, cols = ((est >= taus.index_select(0, samples)[:, None]) & ~pad).nonzero(as_tuple=True)
            if rows.numel():
                _merge(state, taus, samples, rows, rank_keys(est[rows, cols], cols + lo))


def _merge(state: RunningTopK, taus: torch.Tensor, samples: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> None:
    """Merge ``keys`` [n] (row-major: rows [n] ascending into ``samples`` [S]) into the running top-K' keys and
    update ``taus``. The few passing keys are compacted first, so a large K' costs a top-K' over about K' keys."""
    counts = torch.bincount(rows, minlength=samples.shape[0])
    rank = torch.arange(rows.shape[0]) - (torch.cumsum(counts, 0) - counts).index_select(0, rows)
    pending = torch.full((samples.shape[0], int(counts.max())), NO_KEY, dtype=torch.int64)
    pending[rows, rank] = keys
    both = torch.cat([state.keys.index_select(0, samples), pending], 1)
    merged = torch.topk(both, state.k, dim=1, sorted=False).values
    state.keys[samples] = merged
    kth = merged.min(1).values
    ordered = (kth >> 32).to(torch.int32)
    score = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    taus[samples] = torch.where(kth == NO_KEY, torch.full((), float("-inf")), score)


def _rescore(table: torch.Tensor, norms: RowNorms, target_ids: torch.Tensor, history_ids: torch.Tensor,
             state: RunningTopK, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` of the K' candidates in ``state`` by exact cosine (rank keys rebuilt from exact scores)."""
    keys = state.keys
    valid = keys != NO_KEY
    positions = torch.where(valid, keys & 0xFFFFFFFF, torch.zeros((), dtype=torch.int64))
    ids = history_ids.gather(1, positions)
    exact = _candidate_cosines(table, norms, target_ids, ids, valid)
    rescored = torch.where(valid, rank_keys(exact, positions), torch.full((), NO_KEY))
    out = RunningTopK(keys.shape[0], k)
    out.keys = torch.topk(rescored, k, dim=1).values
    return out.result()


# Candidate rows gathered per block of the int8 re-scoring (float32 copies: 16 MB at D = 128).
_RESCORE_ROWS = 1 << 15


def _candidate_cosines(table: torch.Tensor, norms: RowNorms, target_ids: torch.Tensor, ids: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
    """float32 [B, K'] exact cosines of candidates ``ids`` [B, K'] with their samples' targets, 0 where not ``valid``;
    bit-identical to ``pair_cosine`` (and so to ``cosine_topk``). int8 tables: each sample's target row is gathered
    once and dotted with its candidates by one float32 ``bmm`` (every int8 dot of D <= 1024 is an integer below
    2**24, exact in float32 in any order); other dtypes: ``pair_cosine`` pair by pair."""
    batch, width = ids.shape
    out = torch.zeros(batch, width, dtype=torch.float32)
    if not kernels.float32_exact(table):
        rows, _ = valid.nonzero(as_tuple=True)
        if rows.numel():
            out[valid] = pair_cosine(table, norms, ids[valid], target_ids.index_select(0, rows))
        return out
    targets = table.index_select(0, target_ids).to(torch.float32)  # [B, D]
    sq_t = norms.sq_norm.index_select(0, target_ids)
    step = max(1, _RESCORE_ROWS // width)
    for b0 in range(0, batch, step):
        block = ids[b0:b0 + step]
        rows = table.index_select(0, block.reshape(-1)).to(torch.float32).view(block.shape[0], width, -1)
        dots = torch.bmm(rows, targets[b0:b0 + step, :, None]).squeeze(2).double()
        sq_r = norms.sq_norm.index_select(0, block.reshape(-1)).view(block.shape)
        out[b0:b0 + step] = cosines(dots, sq_r, sq_t[b0:b0 + step, None].expand_as(sq_r))
    return torch.where(valid, out, torch.zeros((), dtype=torch.float32))
