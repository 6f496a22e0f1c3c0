"""The two implementations of the approximate GSU's scan (``model.gsu.pq_topk``): a history's PQ codes summed
into per-target estimates and each sample's top-K' rank keys kept, then the re-scoring's exact int8 dots.
``model.gsu.kernels`` measures which runs (op ``pq_scan``); both give identical keys and dots.

- ``torch`` (``TorchScan``): one ``embedding_bag`` (mode "sum") over the codes offset into the lookup tables,
  streamed in pieces of positions; estimates at or above a sample's running K'-th score become rank keys and are
  merged by ``topk``. Re-scoring: the candidate rows gathered and dotted with their target in float32 ``bmm``.
  Runs everywhere (the fallback where no C compiler exists).
- ``native`` (``NativeScan``, ``model.gsu.pq_native``): one C pass per history: codes gathered with prefetching,
  the M entries summed from L1-resident lookup tables, each target's running top-K' kept in C (a buffer of 2 K'
  cut by quickselect, ``model.gsu.rank_keys_c``). Re-scoring: the (candidate, target) pairs' int8 dots gathered
  and summed in C. Offered only where the library builds.

Groups: each entry of ``groups`` lists the samples sharing one history row (``history_groups``); a history is
read once for all of its group's targets in both implementations.
"""

from typing import Dict, List

import torch

from model.gsu import pq_native

# model.gsu.ranking is imported where it is used: it imports model.gsu.cosine, which imports model.gsu.kernels,
# which imports this module (the kernel registry), so a module-level import would be circular.


class PQScan:
    """scan(codes, luts, history_ids, groups, width, chunk_rows) -> int64 [B, width] rank keys (unordered rows,
    NO_KEY = empty): the ``width`` largest keys of each sample's non-padding positions by estimate.
    codes uint8 [N, M]; luts float32 [B, M * C] (entry (m, c) of sample b's target at m * C + c, C <= 256).
    rescore_dots(table, ids, target_ids) -> float64 [B, K'] exact dots of int8 rows ``ids`` [B, K'] with rows
    ``target_ids`` [B]."""

    name = ""

    def supports(self, width: int) -> bool:
        raise NotImplementedError

    def unsupported(self, width: int) -> str:
        """Why ``supports(width)`` is False."""
        return f"unsupported for M={width}"

    def scan(self, codes: torch.Tensor, luts: torch.Tensor, history_ids: torch.Tensor, groups: List[List[int]],
             width: int, chunk_rows: int) -> torch.Tensor:
        raise NotImplementedError

    def rescore_dots(self, table: torch.Tensor, ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def history_error(table_rows: int, ids: torch.Tensor) -> ValueError:
    """The one-line error for history ids outside a table of ``table_rows`` rows."""
    lo, hi = torch.aminmax(ids)
    return ValueError(f"history_ids: ids must lie in [0, {table_rows}) (the table's rows), got [{int(lo)}, {int(hi)}]")


class TorchScan(PQScan):
    """``embedding_bag`` sums, threshold and ``topk`` merges; ``bmm`` re-scoring (module docstring)."""

    name = "torch"
    _RESCORE_ROWS = 1 << 15  # candidate rows converted per block of the re-scoring (16 MB of float32 at D = 128)

    def supports(self, width: int) -> bool:
        return True

    def scan(self, codes: torch.Tensor, luts: torch.Tensor, history_ids: torch.Tensor, groups: List[List[int]],
             width: int, chunk_rows: int) -> torch.Tensor:
        from model.gsu.ranking import NO_KEY

        batch = history_ids.shape[0]
        keys = torch.full((batch, width), NO_KEY, dtype=torch.int64)
        taus = torch.full((batch,), float("-inf"))  # score of each sample's K'-th key (-inf: not full)
        if int(history_ids.max()) >= codes.shape[0] or int(history_ids.min()) < 0:
            raise history_error(codes.shape[0], history_ids)
        for size, members in _by_size(groups).items():
            _score_groups(codes, luts, history_ids, members, size, keys, taus, chunk_rows)
        return keys

    def rescore_dots(self, table: torch.Tensor, ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Each target row gathered once and dotted with its candidates by one float32 ``bmm`` (every int8 dot of
        D <= 1024 is an integer below 2**24, exact in float32 in any order)."""
        batch, width = ids.shape
        out = torch.empty(batch, width, dtype=torch.float64)
        targets = table.index_select(0, target_ids).to(torch.float32)  # [B, D]
        step = max(1, self._RESCORE_ROWS // max(1, width))
        for b0 in range(0, batch, step):
            block = ids[b0:b0 + step]
            rows = table.index_select(0, block.reshape(-1)).to(torch.float32).view(block.shape[0], width, -1)
            out[b0:b0 + step] = torch.bmm(rows, targets[b0:b0 + step, :, None]).squeeze(2).double()
        return out


class NativeScan(PQScan):
    """``model.gsu.pq_native``: the C scan and pair dots (module docstring)."""

    name = "native"

    def supports(self, width: int) -> bool:
        return pq_native.library() is not None

    def unsupported(self, width: int) -> str:
        return f"unavailable: {pq_native.unavailable_reason()}"

    def scan(self, codes: torch.Tensor, luts: torch.Tensor, history_ids: torch.Tensor, groups: List[List[int]],
             width: int, chunk_rows: int) -> torch.Tensor:
        """One C call for the whole batch (per-group calls from Python cost more than a 1,000-behavior scan), with
        one history row per group (a history broadcast to many samples is not copied for each)."""
        keys = torch.empty(history_ids.shape[0], width, dtype=torch.int64)
        members = torch.tensor([b for group in groups for b in group], dtype=torch.int64)
        starts = torch.zeros(len(groups) + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor([len(group) for group in groups], dtype=torch.int64), 0, out=starts[1:])
        firsts = members.index_select(0, starts[:-1])
        if firsts.shape[0] == history_ids.shape[0] and bool((firsts == torch.arange(firsts.shape[0])).all()):
            history = history_ids.contiguous()  # one sample per history, in order: its rows as they are
        else:
            history = history_ids.index_select(0, firsts)  # [Q, L], one row per group
        bad = pq_native.scan(codes.contiguous(), history, native_luts(luts, codes.shape[1]), members, starts, keys)
        if bad >= 0:
            raise history_error(codes.shape[0], history.view(-1)[bad:bad + 1])
        return keys

    def rescore_dots(self, table: torch.Tensor, ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty(ids.shape, dtype=torch.int32)
        if pq_native.pair_dots(table.contiguous(), ids.contiguous(), target_ids.contiguous(), out) >= 0:
            raise history_error(table.shape[0], ids)
        return out.double()


def native_luts(luts: torch.Tensor, m: int) -> torch.Tensor:
    """float32 [B, M * 256] contiguous from ``luts`` [B, M * C] (C <= 256): entry (m, c) at m * 256 + c (codes
    C..255 of a subspace, which no item has, read 0)."""
    c = luts.shape[1] // m
    if c == pq_native.LUT_CODES:
        return luts.contiguous()
    out = torch.zeros(luts.shape[0], m, pq_native.LUT_CODES, dtype=torch.float32)
    out[:, :, :c] = luts.view(-1, m, c)
    return out.view(luts.shape[0], m * pq_native.LUT_CODES)


def _by_size(groups: List[List[int]]) -> Dict[int, List[List[int]]]:
    """Groups of samples sharing a history, bucketed by their size (one bag weight layout per size)."""
    out: Dict[int, List[List[int]]] = {}
    for members in groups:
        out.setdefault(len(members), []).append(members)
    return out


def _score_groups(codes: torch.Tensor, luts: torch.Tensor, history_ids: torch.Tensor, groups: List[List[int]], size: int,
                  keys: torch.Tensor, taus: torch.Tensor, chunk_rows: int) -> None:
    """Stream the histories of ``groups`` (each ``size`` samples sharing one history row) into ``keys`` [B, K'].

    The bag weight is [groups * M * C, size]: row (g, m, c) holds LUT[m, c] of group g's ``size`` targets, so one
    bag of M codes (offset by m * C + g * M * C) sums a behavior's estimate for all of its group's targets at once.
    Groups are taken a batch at a time so each piece holds about ``chunk_rows`` (history, position) pairs. Only
    estimates at or above a sample's running K'-th score (``taus``) become rank keys and are merged.
    """
    from model.gsu.ranking import rank_keys

    m = codes.shape[1]
    c = luts.shape[1] // m
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
            bags = (codes.index_select(0, ids.reshape(-1)).view(g, w, m).to(torch.int32) + base).view(g * w, m)
            est = torch.nn.functional.embedding_bag(bags, weight, mode="sum").view(g, w, size)
            est = est.clamp(-1.0, 1.0).permute(0, 2, 1).reshape(g * size, w) + 0.0  # [samples, w]; + 0.0: no -0.0 keys
            pad = ids == 0 if size == 1 else (ids == 0).repeat_interleave(size, dim=0)
            rows, cols = ((est >= taus.index_select(0, samples)[:, None]) & ~pad).nonzero(as_tuple=True)
            if rows.numel():
                _merge(keys, taus, samples, rows, rank_keys(est[rows, cols], cols + lo))


def _merge(keys: torch.Tensor, taus: torch.Tensor, samples: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> None:
    """Merge ``new`` [n] (row-major: rows [n] ascending into ``samples`` [S]) into the running top-K' ``keys``
    [B, K'] and update ``taus``. The few passing keys are compacted first, so a large K' costs a top-K' over
    about K' keys."""
    from model.gsu.ranking import NO_KEY

    counts = torch.bincount(rows, minlength=samples.shape[0])
    rank = torch.arange(rows.shape[0]) - (torch.cumsum(counts, 0) - counts).index_select(0, rows)
    pending = torch.full((samples.shape[0], int(counts.max())), NO_KEY, dtype=torch.int64)
    pending[rows, rank] = new
    both = torch.cat([keys.index_select(0, samples), pending], 1)
    merged = torch.topk(both, keys.shape[1], dim=1, sorted=False).values
    keys[samples] = merged
    kth = merged.min(1).values
    ordered = (kth >> 32).to(torch.int32)
    score = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    taus[samples] = torch.where(kth == NO_KEY, torch.full((), float("-inf")), score)
