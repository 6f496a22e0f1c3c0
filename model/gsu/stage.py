"""``GsuStage``: the input-pipeline stage that turns a ``RawBatch`` into the model's ``Batch``, running the GSU
chosen by the config (in DataLoader workers during training, and the same stage at inference)."""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from datapipes.batch import HISTORY_FEATURES, SEQUENCE_FEATURES, SPARSE_FEATURES, Batch, RawBatch
from model.gsu.cosine import history_cosines, pair_cosine
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


class GsuStage:
    """Picklable ``RawBatch -> Batch`` transform run in DataLoader workers (and at inference).

    config: anything with ``gsu`` ("none" | "category" | "multimodal" | "id" | "attention"), ``k`` and
            ``recent_len`` (``model.config.ModelConfig``).
    mm_table: ``MMTable`` (or a raw [N, D] tensor; its normalisation is then computed here, once).

    The Batch carries: recent_* = the last ``recent_len`` non-padding behaviors, oldest first, with their
    cosines ``recent_scores`` [B, recent_len]; gsu_* = the selected behaviors with ``gsu_scores`` [B, k]:
    "multimodal" (MUSE) the cosine top-k in descending score, "category" (SIM-hard) the k most recent
    behaviors of the target's category, newest first, "none" (DIN), "id" (SIM-soft) and "attention" (TWIN)
    none; the last two add hist_* (the whole non-padding history, oldest first) and ``history_scores`` [B, L].
    """

    def __init__(self, config: Any, mm_table: Any, chunk_rows: Optional[int] = None):
        for field in ("gsu", "k", "recent_len"):
            if not hasattr(config, field):
                raise ValueError(f"config: has no field {field!r} (expected a ModelConfig)")
        if config.gsu not in ("none", "category", "multimodal", "id", "attention"):
            raise ValueError(f"config.gsu: unknown GSU {config.gsu!r}")
        self.config = config
        self.mm_table = mm_table if isinstance(mm_table, MMTable) else MMTable(mm_table)
        self.chunk_rows = chunk_rows

    def __call__(self, raw: RawBatch) -> Batch:
        cfg, table, norms = self.config, self.mm_table.table, self.mm_table.norms
        items, cats, batch = raw.history_items, raw.history_cats, raw.batch_size
        in_model = cfg.gsu in ("id", "attention")
        recent = _last_matches(lambda rows, lo: items[rows, lo:] != 0, batch, items.shape[1], cfg.recent_len)
        recent_ids = _take(items, recent)
        sequence = {
            "target_item": (raw.target_item, torch.ones_like(raw.target_item)),
            "target_cat": (raw.target_cat, torch.ones_like(raw.target_cat)),
            "recent_item": (recent_ids, recent.lengths),
            "recent_cat": (_take(cats, recent), recent.lengths),
        }
        chosen, scores = self._pipeline_gsu(raw, table, norms)
        sequence["gsu_item"] = (_take(items, chosen), chosen.lengths)
        sequence["gsu_cat"] = (_take(cats, chosen), chosen.lengths)
        history_scores = None
        if in_model:
            whole = _all_real(items != 0)
            sequence["hist_item"] = (_take(items, whole), whole.lengths)
            sequence["hist_cat"] = (_take(cats, whole), whole.lengths)
            history_scores = _left_align(history_cosines(table, norms, raw.target_item, items, self.chunk_rows), whole)
        keys = list(SEQUENCE_FEATURES) + (list(HISTORY_FEATURES) if in_model else [])
        return Batch(
            sparse_features=_sparse_features(raw),
            sequence_features=_kjt(sequence, keys),
            labels=raw.labels.to(torch.float32),
            recent_scores=_scores_for(table, norms, recent_ids, raw.target_item, recent, cfg.recent_len),
            gsu_scores=scores,
            history_scores=history_scores,
        )

    def _pipeline_gsu(self, raw: RawBatch, table: torch.Tensor, norms: RowNorms) -> Tuple[_Selection, torch.Tensor]:
        """The GSU of the pipeline variants: (selection, float32 [B, k] scores aligned with it)."""
        k, batch, length = self.config.k, raw.batch_size, raw.history_items.shape[1]
        if self.config.gsu not in ("category", "multimodal") or length == 0:
            return _Selection.empty(batch), torch.zeros(batch, k, dtype=torch.float32)
        if self.config.gsu == "multimodal":
            width = min(k, length)
            mm = self.mm_table
            scores, positions, valid = cosine_topk(table, raw.target_item, raw.history_items, width, norms=norms,
                                                   chunk_rows=self.chunk_rows, shadow=mm.shadow,
                                                   int8_filter=mm.shadow is not None)
            scores = torch.where(valid, scores, torch.zeros((), dtype=torch.float32))
            return _Selection(positions, valid.sum(1)), _pad_to(scores, k)
        items, cats, target_cat = raw.history_items, raw.history_cats, raw.target_cat

        def same_category(rows: torch.Tensor, lo: int) -> torch.Tensor:
            wanted = target_cat[rows, None]
            return (items[rows, lo:] != 0) & (cats[rows, lo:] == wanted) & (wanted != 0)

        chosen = _last_matches(same_category, batch, length, k, newest_first=True)
        return chosen, _scores_for(table, norms, _take(items, chosen), raw.target_item, chosen, k)

    def __repr__(self) -> str:
        return f"GsuStage(gsu={self.config.gsu!r}, k={self.config.k}, recent_len={self.config.recent_len}, {self.mm_table!r})"


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


def _sparse_features(raw: RawBatch) -> KeyedJaggedTensor:
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
