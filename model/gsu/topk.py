"""``cosine_topk``: exact cosine top-K of each sample's target item against its whole behavior history in the
frozen multimodal table.

The history is streamed in pieces of positions, newest first, so memory stays bounded by the piece whatever
L is (no float [B, L, D] tensor ever exists). Per piece the rows are gathered a few hundred KB at a time and
their dot products with the target taken at once (``model.gsu.filter``, by the kernel measured fastest on the
host, ``model.gsu.kernels``): exact integers for int8 tables, on the
table's int8 shadow for bf16/float32 ones (``model.gsu.shadow``, with its quantization error bounded);
only rows whose dot could still reach the running K-th best cosine are kept: the bound uses the smallest
norm of any table row, so no row that belongs in the top K is dropped. Those few candidates get their
cosine (dot / sqrt(|r|^2 |t|^2) in float64 from the stored squared norms, rounded to float32) and are merged
into the running top K once per piece (``model.gsu.ranking``): equal scores rank the larger (more recent)
position first, deterministically.

Samples of a batch that share a history (the same user, ~11 samples per user in Taobao-MM) are detected
(identical rows) and that history is fetched and scored once for all of their targets; short histories of
several samples or users are packed into one product per block. One history broadcast to every target
(serving's ``rank()``: a stride-0 view) is scored once per distinct item (``_broadcast_topk``).
"""

import math
from typing import List, Optional, Tuple

import torch

from model.gsu import dense_select, kernels
from model.gsu.cosine import cosines, exact_dots
from model.gsu.filter import FilterDots
from model.gsu.inputs import check_inputs, chunk_rows_for, gather, norms_for, shadow_for
from model.gsu.shadow import FilterShadow
from model.gsu.ranking import NO_KEY, Candidates, RunningTopK, rank_keys, sorted_result
from model.gsu.table import RowNorms

# Most histories scored together in one block (short pieces: one gather and one product for all of them).
MAX_PACKED = 16
# Most samples scored together against one shared history (a larger group is split), and most samples of a block.
MAX_SHARED = 64
# One history broadcast to every target (serving) with at most this many distinct items is scored densely (every
# target x item in one product, ``_dense_topk``), DENSE_ENTRIES (target, item) pairs at a time.
DENSE_ITEMS = 1 << 17
DENSE_ENTRIES = 1 << 22
DENSE_SAMPLE = 4096  # items of each target's sample for the dense prefilter's bound
# Most dot products of one block: a block multiplies every row by every sample's target of the block (and keeps
# each history's own), so packing stops where that waste would cost more than the per-block overhead it saves.
BLOCK_DOTS = 1 << 18


def cosine_topk(
    table: torch.Tensor,
    target_ids: torch.Tensor,
    history_ids: torch.Tensor,
    k: int,
    norms: Optional[RowNorms] = None,
    chunk_rows: Optional[int] = None,
    share_histories: bool = True,
    shadow: Optional[FilterShadow] = None,
    int8_filter: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-``k`` history behaviors of each sample by cosine with its target in ``table``.

    table:       [N, D] float32, bfloat16 or int8 (int8 stands for value / 127); row 0 is padding.
    target_ids:  int64 [B] rows of ``table``.
    history_ids: int64 [B, L] rows of ``table``, 0 = padding (never selected); any L.
    k:           1 <= k <= L.
    norms:       optional precomputed ``RowNorms`` of ``table`` (``MMTable.norms``); computed once per table
                 tensor and cached otherwise.
    chunk_rows:  history positions filtered per step (default DEFAULT_CHUNK_ROWS); memory stays within a few
                 times ``chunk_rows * (4 * targets per block + 32)`` bytes plus one L2-sized gather buffer,
                 whatever B and L.
    share_histories: score identical history rows once for all their samples.
    shadow:      optional precomputed ``FilterShadow`` of a bf16/float32 ``table`` (``MMTable.shadow``); built once
                 per table tensor and cached otherwise.
    int8_filter: for bf16/float32 tables, prefilter on the int8 shadow (half the bytes of a bf16 row; the
                 shadow costs N x D bytes) instead of the table's own rows. Results are the same either way.

    Returns ``scores`` float32 [B, k]: cosine as on the float table, descending among valid slots (ties:
    larger position first); ``positions`` int64 [B, k]: indices into L; ``valid`` bool [B, k]: False where
    the sample has fewer than k non-padding behaviors (those slots come last, with score 0 and position 0).
    A zero content row has cosine 0.
    """
    check_inputs(table, target_ids, history_ids, k)
    chunk_rows = chunk_rows_for(table, chunk_rows)
    norms = norms_for(table, norms)
    shadow = shadow_for(table, norms, shadow, int8_filter)
    if share_histories and history_ids.shape[0] > 1 and history_ids.stride(0) == 0:
        return _broadcast_topk(table, target_ids, history_ids[0], k, norms, chunk_rows, shadow)
    return _streaming_topk(table, target_ids, history_ids, k, norms, chunk_rows, share_histories, shadow)


def _streaming_topk(table: torch.Tensor, target_ids: torch.Tensor, history_ids: torch.Tensor, k: int, norms: RowNorms,
                    chunk_rows: int, share_histories: bool, shadow: Optional[FilterShadow]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cosine_topk`` on checked arguments: the history streamed in pieces, filtered block by block."""
    batch, length = history_ids.shape
    filters = FilterDots(table, norms, target_ids, chunk_rows, shadow)
    state = RunningTopK(batch, k)
    groups = history_groups(history_ids) if share_histories else [[b] for b in range(batch)]
    for start, end in pieces(length, k, chunk_rows):
        width = end - start
        found = Candidates()
        for block in blocks(groups, width, chunk_rows, filters.gather_rows):
            reps = [members[0] for members in block]
            ids = history_ids[reps[0], start:end] if len(reps) == 1 else history_ids[torch.tensor(reps), start:end].reshape(-1)
            if int(torch.count_nonzero(ids)) == 0:  # all padding (count_nonzero is ~4x faster than any())
                continue
            _filter_block(filters, state, ids, block, start, width, found)
            if found.size >= chunk_rows:  # keep memory bounded by the chunk, whatever the batch size
                found.merge_into(norms, filters.sq_t, state)
                found = Candidates()
        found.merge_into(norms, filters.sq_t, state)
    return state.result()


# --------------------------------------------------------------------------------------------------------
# Work decomposition: shared histories, pieces of positions, blocks of histories.


def history_groups(history_ids: torch.Tensor) -> List[List[int]]:
    """Sample indices grouped by identical history rows (each group's first sample is its representative),
    groups of at most MAX_SHARED samples."""
    batch, length = history_ids.shape
    if batch == 1:
        return [[0]]
    if history_ids.stride(0) == 0:  # one history broadcast to every sample (serving's rank()): no comparison needed
        return [list(range(s, min(s + MAX_SHARED, batch))) for s in range(0, batch, MAX_SHARED)]
    probe = torch.unique(torch.cat([torch.linspace(0, length - 1, 24).long(), torch.arange(max(0, length - 8), length)]))
    _, inverse, counts = torch.unique(history_ids[:, probe], dim=0, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True).tolist()
    groups: List[List[int]] = []
    start = 0
    for count in counts.tolist():  # Python slices: torch.split into ~B pieces costs ~30 us a piece
        members, start = order[start:start + count], start + count
        while members:  # equal probes are only a hint: confirm on the whole row, split any mismatch off
            rep, same, rest = members[0], [members[0]], []
            for m in members[1:]:
                (same if torch.equal(history_ids[m], history_ids[rep]) else rest).append(m)
            groups += [same[i:i + MAX_SHARED] for i in range(0, len(same), MAX_SHARED)]
            members = rest
    return groups


def _broadcast_topk(table: torch.Tensor, target_ids: torch.Tensor, history: torch.Tensor, k: int, norms: RowNorms,
                    chunk_rows: int, shadow: Optional[FilterShadow]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cosine_topk`` of C targets against one history [L] shared by all of them (serving's rank()), scoring each
    distinct item once instead of every position.

    A position's score depends only on its item. Rank the distinct items by (score, newest position): the top k
    positions are all occurrences of the top k items, since any other item has k items ranked above it whose
    newest occurrences all rank above each of its positions. So: the streaming top-k over the distinct items
    ordered by newest occurrence (its tie-break, larger position first, is then the newer item first), then the
    k best (score, position) among the up to k newest occurrences of each selected item.
    """
    count = target_ids.shape[0]
    real = (history != 0).nonzero().squeeze(1)
    if real.numel() == 0:
        return RunningTopK(count, k).result()
    ids = history.index_select(0, real)
    order = torch.argsort(ids, stable=True)  # grouped by item, ascending positions within an item
    item_ids, occurrences = torch.unique_consecutive(ids.index_select(0, order), return_counts=True)
    ends = torch.cumsum(occurrences, 0)  # item i's positions are real[order[ends[i] - occurrences[i]:ends[i]]]
    by_recency = torch.argsort(real.index_select(0, order.index_select(0, ends - 1)))
    distinct = item_ids.index_select(0, by_recency)  # [U] items, oldest newest-occurrence first
    width = min(k, distinct.shape[0])
    if kernels.float32_exact(table) and distinct.shape[0] <= DENSE_ITEMS:
        scores, picked = _dense_topk(table, target_ids, distinct, width, norms)
    else:
        scores, picked, _ = _streaming_topk(table, target_ids, distinct[None, :].expand(count, -1), width, norms,
                                            chunk_rows, True, shadow)  # [C, width], all valid
    item = by_recency.index_select(0, picked.reshape(-1)).view(count, width)  # index into item_ids, best first
    return sorted_result(_occurrence_keys(scores, item, occurrences, ends, order, real, k))  # already descending


def _occurrence_keys(scores: torch.Tensor, item: torch.Tensor, occurrences: torch.Tensor, ends: torch.Tensor,
                     order: torch.Tensor, real: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [C, k] rank keys of the k best (score, position) among the occurrences of each target's selected items.

    scores float32 [C, w], item [C, w]: each target's w selected items (indices into the distinct items, whose
    occurrence counts, cumulative ends, sort order and real positions are ``occurrences``, ``ends``, ``order``,
    ``real`` as in ``_broadcast_topk``), best first. Where no two selected items a target needs tie in score,
    its answer is the items' occurrences newest first, item after item, cut at k: one [C, k] gather. Targets
    with such a tie (equal content rows) take every item's newest min(k, count) occurrences ([c, w, m]) and a
    top-k, which interleaves the tied items' positions. Either way each row comes out sorted descending (empty
    slots, NO_KEY, last), as ``sorted_result`` takes it.
    """
    keys = dense_select.occurrence_keys(scores, item, occurrences, ends, order, real, k)
    if keys is not None:  # the same keys in one C loop
        return keys
    count, width = item.shape
    counts = occurrences.index_select(0, item.reshape(-1)).view(count, width).clamp(max=k)
    upto = torch.cumsum(counts, 1)  # occurrences of the first j + 1 items
    slots = torch.arange(k).expand(count, k)
    rank = torch.searchsorted(upto, slots.contiguous(), right=True)  # [C, k]: the item (rank) filling each slot
    filled = rank < width
    rank = rank.clamp(max=width - 1)
    nth = slots - (upto.gather(1, rank) - counts.gather(1, rank))  # which newest occurrence of that item
    chosen = item.gather(1, rank)
    slot = ends.index_select(0, chosen.reshape(-1)).view(count, k) - 1 - nth
    positions = real.index_select(0, order.index_select(0, slot.clamp_min(0).reshape(-1))).view(count, k)
    keys = torch.where(filled, rank_keys(scores.gather(1, rank), positions), torch.full((), NO_KEY))
    last = rank.max(1).values  # the last item a target needs; a tie with the next one matters too
    ties = (scores[:, 1:] == scores[:, :-1]) & (torch.arange(width - 1)[None, :] <= last[:, None])
    tied = ties.any(1).nonzero().squeeze(1)
    if tied.numel():
        keys[tied] = _interleaved_keys(scores[tied], item[tied], occurrences, ends, order, real, k)
    return keys


def _interleaved_keys(scores: torch.Tensor, item: torch.Tensor, occurrences: torch.Tensor, ends: torch.Tensor,
                      order: torch.Tensor, real: torch.Tensor, k: int) -> torch.Tensor:
    """``_occurrence_keys`` for targets whose selected items tie: all of each item's newest min(k, count)
    occurrences, ranked together. [c, k]."""
    count, width = item.shape
    counts = occurrences.index_select(0, item.reshape(-1)).view(count, width, 1)
    m = min(k, int(counts.max()))  # covers every item's needed occurrences, usually far below k
    nth = torch.arange(m)  # j-th newest occurrence
    slot = ends.index_select(0, item.reshape(-1)).view(count, width, 1) - 1 - nth  # [c, width, m] into order
    positions = real.index_select(0, order.index_select(0, slot.clamp_min(0).reshape(-1))).view(count, width, m)
    keys = rank_keys(scores, torch.zeros_like(item))[:, :, None] | positions  # (score, position) of each
    keys = torch.where(nth < counts, keys, torch.full((), NO_KEY)).view(count, -1)
    if keys.shape[1] < k:  # fewer occurrences than k in all: pad with empty slots
        keys = torch.cat([keys, torch.full((count, k - keys.shape[1]), NO_KEY)], 1)
    return torch.topk(keys, k, dim=1).values  # invalid ones NO_KEY (last)


def _dense_topk(table: torch.Tensor, target_ids: torch.Tensor, items: torch.Tensor, k: int,
                norms: RowNorms) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (k <= U) of the distinct items [U] (non-padding) of one history for each of C targets, from dense
    products: bit-identical to ``_streaming_topk`` on an int8 table, without its per-block filtering.

    The dots of every (target, item) are exact integers (an int8 table's, |dot| <= 2**24 for D <=
    FLOAT32_EXACT_WIDTH, ``model.gsu.kernels``), so they are the filter's, whichever kernel takes them
    (``kernels.dense_kernel``: float32 ``torch.mm``, or int32 sums in C). A prefilter ranks by
    a = fl32(dot * fl32(1 / |r|)), within a relative 2**-23 of dot / |r|, to which the exact score is monotone for
    a given target. With A the k-th largest a of a target (or any lower value: the k-th largest over every
    stride-th item, at least DENSE_SAMPLE of them, is one), any item with a < A - |A| 2**-19 has dot / |r| below
    that of each of the k items at or above A by a relative 2**-21, more than float32 rounding can close, so its
    exact score is strictly lower than theirs and it is not in the top k. The items at or above that bound (at
    least k, usually a few more) get their exact ``cosines`` and ``rank_keys`` (position = index into ``items``),
    and the k best keys win, as in ``_streaming_topk``. Zero rows have a = 0 and score 0.
    Returns (scores float32 [C, k], indices into items int64 [C, k]), best first."""
    rows = gather(table, items)  # [U, D] int8; bad ids: ValueError (history_ids)
    sq_items = norms.sq_norm.index_select(0, items)
    inverse = torch.where(sq_items > 0, 1.0 / sq_items.clamp_min(1.0).sqrt(), torch.zeros((), dtype=torch.float64))
    # The k-th largest a among every stride-th item is at most the k-th of all: a bound as safe, found in a
    # fraction of the time (it keeps a few hundred items instead of a few dozen).
    stride = max(1, min(items.shape[0] // DENSE_SAMPLE, items.shape[0] // k))
    keys = kernels.dense_kernel(table.shape[1]).keys(table.index_select(0, target_ids), rows, inverse.to(torch.float32),
                                                     sq_items, norms.sq_norm.index_select(0, target_ids), k, stride)
    scores, picked, _ = sorted_result(keys)
    return scores, picked


def float32_dense_keys(targets: torch.Tensor, items: torch.Tensor, inverse: torch.Tensor, sq_items: torch.Tensor,
                       sq_targets: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """The ``float32`` dense kernel (``kernels.Float32Dense``): int8 targets [C, D] and items [U, D] converted, their
    dots by ``torch.mm`` DENSE_ENTRIES // U targets at a time, each block's keys by ``dense_select.select_keys``
    (``_select_keys`` where the C kernel is not available). int64 [C, k], descending."""
    rows = items.to(torch.float32)
    step = max(1, DENSE_ENTRIES // items.shape[0])
    keys = []
    for start in range(0, targets.shape[0], step):
        dots = torch.mm(targets[start:start + step].to(torch.float32), rows.t())  # [c, U], exact integers
        block = sq_targets[start:start + step]
        selected = dense_select.select_keys(dots, inverse, sq_items, block, k, stride)
        keys.append(selected if selected is not None else _select_keys(dots, inverse, sq_items, block, k, stride))
    return torch.cat(keys)


def _select_keys(dots: torch.Tensor, inverse: torch.Tensor, sq_items: torch.Tensor, sq_targets: torch.Tensor, k: int,
                 stride: int) -> torch.Tensor:
    """``dense_select.select_keys`` in torch ops, where the C kernel is not available: int64 [c, k] descending."""
    approx = dots * inverse
    kth = torch.topk(approx[:, ::stride], k, dim=1, sorted=False).values.amin(1)
    bound = kth - kth.abs() * 2.0 ** -19 - 1e-30
    row, col = (approx >= bound[:, None]).nonzero(as_tuple=True)  # row-major: ascending targets
    found = rank_keys(cosines(dots[row, col].double(), sq_items.index_select(0, col), sq_targets.index_select(0, row)),
                      col)
    counts = torch.bincount(row, minlength=dots.shape[0])
    within = torch.arange(row.shape[0]) - (torch.cumsum(counts, 0) - counts).index_select(0, row)
    padded = torch.full((dots.shape[0], int(counts.max())), NO_KEY, dtype=torch.int64)
    padded[row, within] = found
    return torch.topk(padded, k, dim=1).values


def pieces(length: int, k: int, chunk_rows: int) -> List[Tuple[int, int]]:
    """Position ranges, newest first, growing 4x from a short first piece (enough to fill the top k and set a
    threshold) up to ``chunk_rows``, so the threshold is already tight when the long pieces come."""
    out: List[Tuple[int, int]] = []
    size, end = min(chunk_rows, max(8 * k, 256)), length
    while end > 0:
        out.append((max(0, end - size), end))
        end -= size
        size = min(chunk_rows, size * 4)
    return out


def blocks(groups: List[List[int]], width: int, chunk_rows: int, gather_rows: int) -> List[List[List[int]]]:
    """The groups of one piece, in blocks. Histories of at least ``gather_rows`` rows: one group a block (each
    gather is large enough to pay its own ops). Shorter ones: consecutive groups packed while the block holds at
    most ``chunk_rows`` rows, MAX_PACKED histories, MAX_SHARED samples and BLOCK_DOTS dot products (rows x samples)."""
    if width >= gather_rows:
        return [[members] for members in groups]
    out: List[List[List[int]]] = []
    block: List[List[int]] = []
    samples = 0
    for members in groups:
        grown = samples + len(members)
        if block and (len(block) == MAX_PACKED or (len(block) + 1) * width > chunk_rows or grown > MAX_SHARED
                      or (len(block) + 1) * width * (grown + 7) > BLOCK_DOTS):
            out.append(block)
            block, grown = [], len(members)
        block.append(members)
        samples = grown
    if block:
        out.append(block)
    return out


# --------------------------------------------------------------------------------------------------------
# Filtering one block.


def _filter_block(filters: FilterDots, state: RunningTopK, ids: torch.Tensor, block: List[List[int]], start: int,
                  width: int, found: Candidates) -> None:
    """Filter one block: add the rows whose exact score could reach their sample's running k-th to ``found``.

    block: groups of samples, each group sharing one history; ids: int64 [len(block) * width] the table rows of the
    block's histories, one after another (group i's at i * width...); start: position of column 0 in L.
    """
    samples = [s for members in block for s in members]
    taus = [state.tau[s] for s in samples]
    if not filters.exact_int and max(taus) == -math.inf:
        # Nothing to filter against yet (every row is a candidate): score the block directly.
        _add_all(filters, ids, block, samples, start, width, found)
        return
    needs = filters.thresholds(taus, samples)
    dots = filters.block_dots(ids, samples)  # [n * width, S]
    group_of = _group_of(block)
    per_sample = _own_rows(dots, group_of, len(block), width)  # [S, width]: each sample's own history's dots
    hits = (per_sample >= filters.threshold_tensor(needs, dots.dtype)[:, None]).nonzero()  # row-major: ascending samples
    if hits.shape[0] == 0:
        return
    columns, within = hits[:, 0], hits[:, 1]
    d = per_sample[columns, within]
    local = within if len(block) == 1 else group_of.index_select(0, columns) * width + within
    cand_ids = ids.index_select(0, local)
    # Padding rows (id 0) never count: they pass a threshold <= 0 (dot 0), or any threshold when the table's
    # row 0 is not zero, so drop them whatever the threshold (a check over the few candidates).
    real = cand_ids != 0
    if not bool(real.all()):
        columns, within, d, cand_ids = columns[real], within[real], d[real], cand_ids[real]
        if columns.numel() == 0:
            return
    if filters.exact_int:
        exact = d.double()
    else:  # the few candidates' rows again (the gather buffer has moved on), dotted exactly
        targets = filters.targets.index_select(0, torch.tensor(samples).index_select(0, columns))
        exact = exact_dots(gather(filters.table, cand_ids), targets)
    found.add(samples, columns, within + start, cand_ids, exact)


def _group_of(block: List[List[int]]) -> torch.Tensor:
    """int64 [S]: the block's group (history) of each of its samples, in block order."""
    return torch.tensor([i for i, members in enumerate(block) for _ in members])


def _own_rows(dots: torch.Tensor, group_of: torch.Tensor, histories: int, width: int) -> torch.Tensor:
    """[S, width] from dots [histories * width, S]: sample c's dots with the rows of its own history group_of[c]
    (one indexing op; the other histories' products are never compared)."""
    if histories == 1:
        return dots.t()
    return dots.view(histories, width, -1)[group_of, :, torch.arange(group_of.shape[0])]


def _add_all(filters: FilterDots, ids: torch.Tensor, block: List[List[int]], samples: List[int], start: int,
             width: int, found: Candidates) -> None:
    """Every non-padding row of a block is a candidate of each sample of its group: exact dots of the whole block at
    once (while the block's samples have fewer than k behaviors so far: usually only the short first piece)."""
    columns = torch.arange(len(samples)).repeat_interleave(width)  # every (sample, own row) pair, by sample
    within = torch.arange(width).repeat(len(samples))
    cand_ids = ids.index_select(0, _group_of(block).index_select(0, columns) * width + within)
    real = cand_ids != 0
    if not bool(real.any()):
        return
    columns, within, cand_ids = columns[real], within[real], cand_ids[real]
    targets = filters.targets.index_select(0, torch.tensor(samples).index_select(0, columns))
    exact = exact_dots(gather(filters.table, cand_ids), targets)  # one gather of exactly the pairs' rows
    found.add(samples, columns, within + start, cand_ids, exact)
