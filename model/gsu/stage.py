"""``GsuStage``: the input-pipeline stage that turns a ``RawBatch`` into the model's ``Batch``, running the GSU
chosen by the config (in DataLoader workers during training, and the same stage at inference). ``select`` is the
part a stored retrieval keeps (``Selected``); ``assemble_batch`` builds the ``Batch`` from it, for both paths."""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from datapipes.batch import HISTORY_FEATURES, SEQUENCE_FEATURES, SPARSE_FEATURES, Batch, RawBatch
from model.gsu import kernels
from model.gsu.cosine import history_cosines, pair_cosine
from model.gsu.pq import PQIndex, PQSettings
from model.gsu.pq_topk import pq_topk
from model.gsu.topk import cosine_topk
from model.gsu.table import MMTable, RowNorms


@dataclass(frozen=True)
class _Selection:
    """Per-sample ragged selection of history positions, as a padded [B, W] matrix plus lengths."""

    positions: torch.Tensor  # int64 [B, W], valid slots first
    lengths: torch.Tensor  # int64 [B]

    @property
    def mask(self) -> torch.Tensor:
        return torch.arange(self.positions.shape[1])[None, :] < self.lengths[:, None]

    @classmethod
    def empty(cls, batch: int) -> "_Selection":
        return cls(torch.zeros(batch, 0, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64))


@dataclass(frozen=True)
class Selected:
    """What the ESU reads of a batch's histories, flat and sample-major (what a stored retrieval keeps).

    recent_item, recent_cat: int64 [sum(recent_lengths)] the recent behaviors, oldest first; recent_lengths [B].
    recent_scores: float32 [B, S] their cosines with the target, 0 past the sample's count.
    gsu_item, gsu_cat: int64 [sum(gsu_lengths)] the GSU's selected behaviors in its order; gsu_lengths [B].
    gsu_scores: float32 [B, K] their cosines R, 0 past the sample's count.
    gsu_index: None, or (one user's candidates, ``Batch.gsu_index``) int64 [B, K]: gsu_item / gsu_cat then hold the
               U distinct selected behaviors (gsu_lengths [U, 0, ...]) and slot j of sample b is gsu_index[b, j].
    """

    recent_item: torch.Tensor
    recent_cat: torch.Tensor
    recent_lengths: torch.Tensor
    recent_scores: torch.Tensor
    gsu_item: torch.Tensor
    gsu_cat: torch.Tensor
    gsu_lengths: torch.Tensor
    gsu_scores: torch.Tensor
    gsu_index: Optional[torch.Tensor] = None


class GsuStage:
    """Picklable ``RawBatch -> Batch`` transform run in DataLoader workers (and at inference).

    config: anything with ``gsu`` ("none" | "category" | "multimodal" | "id" | "attention"), ``k`` and
            ``recent_len`` (``model.config.ModelConfig``).
    mm_table: ``MMTable`` (or a raw [N, D] tensor; its normalisation is then computed here, once).
    pq: the ``PQIndex`` of the table when the config has ``pq_m`` (the approximate multimodal GSU, ``pq_topk``); when
        not given it is opened beside a file-backed table (``muse pq`` writes it; UserError if missing) or, for a
        table without a file, attached later (``attach_pq``) or else built from the table on first use (seeded).

    A history position is real unless it is padding (item 0 and category 0): a behavior whose item is out of the
    vocabulary (item 0, known category) keeps its place in the recent window and in SIM-hard's category search,
    but has no content row, so the multimodal GSU never selects it.
    The Batch carries: recent_* = the last ``recent_len`` real behaviors, oldest first, with their
    cosines ``recent_scores`` [B, recent_len]; gsu_* = the selected behaviors with ``gsu_scores`` [B, k]:
    "multimodal" (MUSE) the cosine top-k in descending score, "category" (SIM-hard) the k most recent
    behaviors of the target's category, newest first, "none" (DIN), "id" (SIM-soft) and "attention" (TWIN)
    none; the last two add hist_* (the whole real history, oldest first) and ``history_scores`` [B, L].
    """

    def __init__(self, config: Any, mm_table: Any, chunk_rows: Optional[int] = None, pq: Optional[PQIndex] = None):
        for field in ("gsu", "k", "recent_len"):
            if not hasattr(config, field):
                raise ValueError(f"config: has no field {field!r} (expected a ModelConfig)")
        if config.gsu not in ("none", "category", "multimodal", "id", "attention"):
            raise ValueError(f"config.gsu: unknown GSU {config.gsu!r}")
        kernels.check_override()  # a bad MUSE_GSU_KERNEL fails here, in the process that builds the stage
        self.config = config
        self.mm_table = mm_table if isinstance(mm_table, MMTable) else MMTable(mm_table)
        self.chunk_rows = chunk_rows
        self.pq_m = getattr(config, "pq_m", None) if config.gsu == "multimodal" else None
        self.pq: Optional[PQIndex] = None
        if pq is not None:
            self.attach_pq(pq)
        elif self.pq_m is not None and self.mm_table.source is not None:
            self.pq = PQIndex.beside(self.mm_table.source, self.pq_m, self.mm_table.num_rows, self.mm_table.dim)

    def attach_pq(self, index: PQIndex) -> None:
        """Use ``index`` (codes of this stage's table) for the approximate GSU."""
        if self.pq_m is None:
            raise ValueError(f"pq: the config's GSU ({self.config.gsu}, pq_m None) reads no PQ codes")
        if index.m != self.pq_m or index.num_rows != self.mm_table.num_rows or index.dim != self.mm_table.dim:
            raise ValueError(f"pq: {index!r} does not fit pq_m {self.pq_m} and {self.mm_table!r}")
        self.pq = index

    def approximate(self, length: int) -> bool:
        """Whether the multimodal GSU over histories of ``length`` positions runs on the PQ codes (``pq_m`` set):
        not when K' >= L, where re-scoring every behavior is exactly ``cosine_topk``'s result and no code is read."""
        candidates = getattr(self.config, "pq_candidates", 0)
        return self.pq_m is not None and (not candidates or candidates < length)

    def pq_index(self) -> PQIndex:
        """The PQ codes the approximate GSU reads (config ``pq_m``): attached, opened beside the table, or else
        built from the table on first use (seeded)."""
        if self.pq is None:  # a table without a file and no codes attached: build them from it, once
            self.pq = PQIndex.build(self.mm_table.table, PQSettings(m=self.pq_m))
        return self.pq

    def select(self, raw: RawBatch) -> Selected:
        """The recent window and the pipeline GSU's selection of every sample, with their cosines."""
        cfg, table, norms = self.config, self.mm_table.table, self.mm_table.norms
        items, cats, batch = raw.history_items, raw.history_cats, raw.batch_size
        recent = _last_matches(lambda rows, lo: (items[rows, lo:] != 0) | (cats[rows, lo:] != 0), batch,
                               items.shape[1], cfg.recent_len)
        recent_ids = _take(items, recent)
        chosen, scores = self._pipeline_gsu(raw, table, norms)
        return Selected(recent_item=recent_ids, recent_cat=_take(cats, recent), recent_lengths=recent.lengths,
                        recent_scores=_scores_for(table, norms, recent_ids, raw.target_item, recent, cfg.recent_len),
                        gsu_item=_take(items, chosen), gsu_cat=_take(cats, chosen), gsu_lengths=chosen.lengths,
                        gsu_scores=scores)

    def __call__(self, raw: RawBatch) -> Batch:
        selected = self.select(raw)
        history = history_scores = None
        if self.config.gsu in ("id", "attention"):
            items, cats = raw.history_items, raw.history_cats
            whole = _all_real((items != 0) | (cats != 0))
            history = (_take(items, whole), _take(cats, whole), whole.lengths)
            table, norms = self.mm_table.table, self.mm_table.norms
            history_scores = _left_align(history_cosines(table, norms, raw.target_item, items, self.chunk_rows), whole)
        return assemble_batch(raw, selected, history, history_scores)

    def _pipeline_gsu(self, raw: RawBatch, table: torch.Tensor, norms: RowNorms) -> Tuple[_Selection, torch.Tensor]:
        """The GSU of the pipeline variants: (selection, float32 [B, k] scores aligned with it)."""
        k, batch, length = self.config.k, raw.batch_size, raw.history_items.shape[1]
        if self.config.gsu not in ("category", "multimodal") or length == 0:
            return _Selection.empty(batch), torch.zeros(batch, k, dtype=torch.float32)
        if self.config.gsu == "multimodal":
            width = min(k, length)
            mm = self.mm_table
            if self.approximate(length):
                scores, positions, valid = pq_topk(self.pq_index(), table, raw.target_item, raw.history_items, width,
                                                   candidates=self.config.pq_candidates, norms=norms,
                                                   chunk_rows=self.chunk_rows)
            else:
                scores, positions, valid = cosine_topk(table, raw.target_item, raw.history_items, width, norms=norms,
                                                       chunk_rows=self.chunk_rows, shadow=mm.shadow,
                                                       int8_filter=mm.shadow is not None)
            scores = torch.where(valid, scores, torch.zeros((), dtype=torch.float32))
            return _Selection(positions, valid.sum(1)), _pad_to(scores, k)
        cats, target_cat = raw.history_cats, raw.target_cat

        def same_category(rows: torch.Tensor, lo: int) -> torch.Tensor:
            wanted = target_cat[rows, None]
            return (cats[rows, lo:] == wanted) & (wanted != 0)

        chosen = _last_matches(same_category, batch, length, k, newest_first=True)
        return chosen, _scores_for(table, norms, _take(raw.history_items, chosen), raw.target_item, chosen, k)

    def __repr__(self) -> str:
        pq = f", pq_m={self.pq_m}" if self.pq_m is not None else ""
        return f"GsuStage(gsu={self.config.gsu!r}{pq}, k={self.config.k}, recent_len={self.config.recent_len}, {self.mm_table!r})"


def assemble_batch(samples: Any, selected: Selected, history: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                   history_scores: Optional[torch.Tensor] = None) -> Batch:
    """The model's ``Batch`` from a batch's sample fields (a ``RawBatch`` or ``SampleBatch``: labels, user_id,
    profile, target_*, item_city, item_province), its ``Selected`` behaviors and, for the in-model GSU variants,
    the whole history (flat items, flat categories, lengths [B]) with ``history_scores`` [B, L]."""
    sequence = {
        "target_item": (samples.target_item, torch.ones_like(samples.target_item)),
        "target_cat": (samples.target_cat, torch.ones_like(samples.target_cat)),
        "recent_item": (selected.recent_item, selected.recent_lengths),
        "recent_cat": (selected.recent_cat, selected.recent_lengths),
        "gsu_item": (selected.gsu_item, selected.gsu_lengths),
        "gsu_cat": (selected.gsu_cat, selected.gsu_lengths),
    }
    keys = list(SEQUENCE_FEATURES)
    if history is not None:
        sequence["hist_item"], sequence["hist_cat"] = (history[0], history[2]), (history[1], history[2])
        keys += list(HISTORY_FEATURES)
    return Batch(
        sparse_features=_sparse_features(samples),
        sequence_features=_kjt(sequence, keys),
        labels=samples.labels.to(torch.float32),
        recent_scores=selected.recent_scores,
        gsu_scores=selected.gsu_scores,
        history_scores=history_scores,
        gsu_index=selected.gsu_index,
    )


def _last_matches(match: Callable[[torch.Tensor, int], torch.Tensor], batch: int, length: int, count: int,
                  newest_first: bool = False) -> _Selection:
    """The last ``count`` positions of each row where ``match(rows, lo)`` (bool [len(rows), length - lo], the
    window of positions lo..L-1) is True: oldest first, or newest first. Looks back through growing windows,
    so only rows that need it are scanned far."""
    width = min(count, length)
    if width == 0:
        return _Selection.empty(batch)
    found = torch.full((batch, width), -1, dtype=torch.int64)
    pending = torch.arange(batch)
    window = min(length, max(4 * width, 256))
    while pending.numel():
        lo = length - window
        key = torch.where(match(pending, lo), torch.arange(lo, length)[None, :], torch.full((), -1))
        newest = torch.topk(key, width, dim=1).values  # descending positions, -1 past the matches
        done = (newest[:, -1] >= 0) | (lo == 0)
        found[pending[done]] = newest[done]
        pending = pending[~done]
        window = min(length, window * 4)
    lengths = (found >= 0).sum(1)
    if not newest_first:
        slots = torch.arange(width)[None, :]
        found = torch.where(slots < lengths[:, None], found.gather(1, (lengths[:, None] - 1 - slots).clamp_min(0)), found)
    return _Selection(found.clamp_min(0), lengths)


def _all_real(real: torch.Tensor) -> _Selection:
    """Every True position of ``real`` [B, L], left-aligned in order."""
    lengths = real.sum(1)
    width = int(lengths.max()) if lengths.numel() else 0
    hits = real.nonzero()  # row-major: (row, position) in order
    starts = torch.cumsum(lengths, 0) - lengths
    rank = torch.arange(hits.shape[0]) - starts.index_select(0, hits[:, 0])
    positions = torch.zeros(real.shape[0], width, dtype=torch.int64)
    positions[hits[:, 0], rank] = hits[:, 1]
    return _Selection(positions, lengths)


def _take(values: torch.Tensor, selection: _Selection) -> torch.Tensor:
    """Flat values [sum(lengths)] of ``values`` [B, L] at the selected positions, sample by sample."""
    return values.gather(1, selection.positions)[selection.mask]


def _left_align(per_position: torch.Tensor, whole: _Selection) -> torch.Tensor:
    """[B, L] values at the selected positions moved to the front (aligned with hist_*), 0 after."""
    out = torch.zeros_like(per_position)
    width = whole.positions.shape[1]
    out[:, :width] = torch.where(whole.mask, per_position.gather(1, whole.positions), torch.zeros(()))
    return out


def _scores_for(table: torch.Tensor, norms: RowNorms, flat_ids: torch.Tensor, target_ids: torch.Tensor,
                selection: _Selection, width: int) -> torch.Tensor:
    """float32 [B, width]: cosines of the selected behaviors (flat_ids, sample-major) with their targets, 0 after."""
    out = torch.zeros(target_ids.shape[0], width, dtype=torch.float32)
    mask = selection.mask
    if flat_ids.numel():
        targets = target_ids[:, None].expand_as(mask)[mask]
        out[:, : mask.shape[1]][mask] = pair_cosine(table, norms, flat_ids, targets)
    return out


def _pad_to(values: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(values, (0, width - values.shape[1])) if values.shape[1] < width else values


def _sparse_features(raw: Any) -> KeyedJaggedTensor:
    columns = [raw.user_id] + [raw.profile[:, i] for i in range(raw.profile.shape[1])] + [raw.item_city, raw.item_province]
    if len(columns) != len(SPARSE_FEATURES):
        raise ValueError(f"raw.profile: expected {len(SPARSE_FEATURES) - 3} columns, got {raw.profile.shape[1]}")
    values = torch.cat([c.reshape(-1).to(torch.int64) for c in columns])
    return KeyedJaggedTensor.from_lengths_sync(keys=list(SPARSE_FEATURES), values=values,
                                               lengths=torch.ones(values.shape[0], dtype=torch.int64))


def _kjt(features: Dict[str, Tuple[torch.Tensor, torch.Tensor]], keys: List[str]) -> KeyedJaggedTensor:
    values = torch.cat([features[key][0].reshape(-1).to(torch.int64) for key in keys])
    lengths = torch.cat([features[key][1].to(torch.int64) for key in keys])
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
