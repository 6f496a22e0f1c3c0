"""Batch scoring of a prepared split with an exported package (``muse predict``)."""

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common.errors import UserError
from datapipes.batch import PROFILE_FIELDS, RawBatch
from datapipes.histories import HistoryGather
from datapipes.prepared import PreparedDataset
from datapipes.reader import make_dataloader
from common.atomic import atomic_file
from inference.loader import load_predictor

OUTPUT_SCHEMA = pa.schema([("row", pa.int64()), ("user_id", pa.int64()), ("item_id", pa.int64()),
                           ("label", pa.float32()), ("score", pa.float32())])


@dataclass(frozen=True)
class PredictSummary:
    path: str
    rows: int
    mean_score: float
    click_rate: float


class RawIds:
    """Vocabulary index -> raw hashed id for each id space of a prepared dataset (index 0 -> 0)."""

    def __init__(self, dataset: PreparedDataset) -> None:
        self._tables: Dict[str, torch.Tensor] = {}
        self._dataset = dataset

    def __call__(self, space: str, indices: torch.Tensor) -> torch.Tensor:
        if space not in self._tables:
            ids = np.asarray(self._dataset.vocab(space).ids, dtype=np.int64)
            self._tables[space] = torch.from_numpy(np.concatenate([np.zeros(1, np.int64), ids]))
        return self._tables[space][indices]


def score_raw_batch(predictor, raw: RawBatch, raw_ids: RawIds) -> torch.Tensor:
    """float32 [B] probabilities of a ``RawBatch`` (vocabulary indices) through the package's raw-id API."""
    profile = torch.stack([raw_ids(f, raw.profile[:, i]) for i, f in enumerate(PROFILE_FIELDS)], dim=1)
    return predictor.score(
        raw_ids("user", raw.user_id), profile, raw_ids("item", raw.target_item),
        raw_ids("item", raw.history_items), raw_ids("category", raw.history_cats),
        target_cat=raw_ids("category", raw.target_cat), item_city=raw_ids("item_city", raw.item_city),
        item_province=raw_ids("item_province", raw.item_province))


def predict_split(package: str, data_dir: str, out: str, split: str = "test", batch_size: int = 1024,
                  max_seq_len: Optional[int] = None) -> PredictSummary:
    """Score every row of ``split`` in stored order and write ``out`` (parquet, ``OUTPUT_SCHEMA``)."""
    if batch_size < 1:
        raise UserError(f"--batch-size: must be >= 1 (got {batch_size})")
    if max_seq_len is not None and max_seq_len < 1:
        raise UserError(f"--max-seq-len: must be >= 1 (got {max_seq_len})")
    dataset = PreparedDataset.open(data_dir)
    dataset.split(split)
    predictor = load_predictor(package)
    if max_seq_len is None:
        max_seq_len = predictor.manifest.get("train_config", {}).get("max_seq_len")
    loader = make_dataloader(data_dir, split, 0, 1, batch_size, transform=HistoryGather(dataset.histories(split), max_seq_len),
                             num_workers=0, shuffle=False,
                             max_seq_len=max_seq_len, drop_last=False, drop_remainder=False)
    raw_ids = RawIds(dataset)
    rows = 0
    score_sum = clicks = 0.0
    with atomic_file(out, flag="--out") as tmp:
        with pq.ParquetWriter(tmp, OUTPUT_SCHEMA) as writer:
            for raw in loader:
                probs = score_raw_batch(predictor, raw, raw_ids)
                b = raw.batch_size
                writer.write_table(pa.table({
                    "row": np.arange(rows, rows + b, dtype=np.int64),
                    "user_id": raw_ids("user", raw.user_id).numpy(),
                    "item_id": raw_ids("item", raw.target_item).numpy(),
                    "label": raw.labels.numpy().astype(np.float32),
                    "score": probs.numpy().astype(np.float32),
                }, schema=OUTPUT_SCHEMA))
                rows += b
                score_sum += float(probs.sum())
                clicks += float(raw.labels.sum())
    return PredictSummary(out, rows, score_sum / max(rows, 1), clicks / max(rows, 1))
