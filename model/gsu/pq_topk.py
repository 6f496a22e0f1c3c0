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

from typing import Optional, Tuple

import torch

from model.gsu import kernels
from model.gsu.cosine import cosines, pair_cosine
from model.gsu.inputs import check_inputs, chunk_rows_for, norms_for
from model.gsu.pq import PQIndex, unit_rows
from model.gsu.pq_scan import PQScan
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
    scan = kernels.pq_scan_kernel(index.m)
    state = RunningTopK(history_ids.shape[0], width)
    state.keys = scan.scan(index.codes, luts, history_ids, groups, width, chunk_rows)
    if not candidates:
        return state.result()
    return _rescore(scan, table, norms, target_ids, history_ids, state, k)


def lookup_tables(index: PQIndex, table: torch.Tensor, norms: RowNorms, target_ids: torch.Tensor) -> torch.Tensor:
    """float32 [B, M * C]: entry (m, c) of row b is <t_b,m / |t_b|, centroid[m, c]> (0 for a zero target)."""
    m, c, _ = index.codebooks.shape
    units = unit_rows(table.index_select(0, target_ids), norms.sq_norm.index_select(0, target_ids))
    parts = units.view(units.shape[0], m, -1)  # [B, M, d]
    return torch.einsum("bmd,mcd->bmc", parts, index.codebooks).reshape(units.shape[0], m * c).contiguous()


def _rescore(scan: PQScan, table: torch.Tensor, norms: RowNorms, target_ids: torch.Tensor, history_ids: torch.Tensor,
             state: RunningTopK, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` of the K' candidates in ``state`` by exact cosine (rank keys rebuilt from exact scores)."""
    keys = state.keys
    valid = keys != NO_KEY
    positions = torch.where(valid, keys & 0xFFFFFFFF, torch.zeros((), dtype=torch.int64))
    ids = history_ids.gather(1, positions)
    exact = _candidate_cosines(scan, table, norms, target_ids, ids, valid)
    rescored = torch.where(valid, rank_keys(exact, positions), torch.full((), NO_KEY))
    out = RunningTopK(keys.shape[0], k)
    out.keys = torch.topk(rescored, k, dim=1).values
    return out.result()


def _candidate_cosines(scan: PQScan, table: torch.Tensor, norms: RowNorms, target_ids: torch.Tensor, ids: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
    """float32 [B, K'] exact cosines of candidates ``ids`` [B, K'] with their samples' targets, 0 where not ``valid``;
    bit-identical to ``pair_cosine`` (and so to ``cosine_topk``). int8 tables: the scan kernel's exact dots
    (``PQScan.rescore_dots``; invalid slots hold id 0, the zero row); other dtypes: ``pair_cosine`` pair by pair."""
    batch, width = ids.shape
    out = torch.zeros(batch, width, dtype=torch.float32)
    if not kernels.float32_exact(table):
        rows, _ = valid.nonzero(as_tuple=True)
        if rows.numel():
            out[valid] = pair_cosine(table, norms, ids[valid], target_ids.index_select(0, rows))
        return out
    dots = scan.rescore_dots(table, ids, target_ids)  # float64 [B, K']
    sq_r = norms.sq_norm.index_select(0, ids.reshape(-1)).view(ids.shape)
    sq_t = norms.sq_norm.index_select(0, target_ids)
    out = cosines(dots, sq_r, sq_t[:, None].expand_as(sq_r))
    return torch.where(valid, out, torch.zeros((), dtype=torch.float32))
