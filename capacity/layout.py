"""Storage of the prepared data: the per-user history store, the sample shards and a stored retrieval.

Plain products (uncompressed bytes; parquet shards compress further), for users U, samples N, history length L:

- history store (``datapipes.histories``), per user: ``L x (4 + c)`` (int32 item id, category id of c = 2 bytes
  when the category vocabulary fits int16, else 4) + 16 (offsets) + 20 (profile), once per user and split;
- sample shard row: 6 x 8 (user, target, its category/city/province, history_end) + 1 (label) = 49;
- stored retrieval (``retrieval.store``), per sample: ``K x 12`` (item, category, cosine) + 4 (count) + ``S x 4``;
- the per-sample-history layout it replaced, per sample: ``L x 8`` + 89 (label, user, 5 profile fields, target and
  its 3 attributes).
Presets have no sample count: they take the release's ~11 samples per user.
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from common.io import path_manager

SAMPLES_PER_USER = 11
SAMPLE_ROW_BYTES = 6 * 8 + 1
COPY_ROW_BYTES = 1 + 8 * 11
OFFSET_PROFILE_BYTES = 16 + 5 * 4


def category_id_bytes(categories: int) -> int:
    return 2 if categories < 2 ** 15 - 1 else 4


@dataclass(frozen=True)
class LayoutRow:
    """Bytes of the prepared data at one history length (see the module docstring)."""

    seq_len: int
    users: int
    samples: int
    history_bytes_per_user: int
    sample_row_bytes: int
    retrieval_bytes_per_sample: int
    per_sample_copy_bytes: int

    @property
    def bytes_per_sample(self) -> float:
        """Store + shards per sample (the store spread over the samples of its users)."""
        return self.sample_row_bytes + self.history_bytes_per_user * self.users / max(1, self.samples)

    @property
    def totals(self) -> Dict[str, int]:
        return {"history_store": self.history_bytes_per_user * self.users, "sample_shards": self.sample_row_bytes * self.samples,
                "stored_retrieval": self.retrieval_bytes_per_sample * self.samples,
                "per_sample_copy_layout": self.per_sample_copy_bytes * self.samples}


def layout_row(seq_len: int, users: int, samples: int, categories: int, k: int, recent_len: int) -> LayoutRow:
    return LayoutRow(seq_len, users, samples, seq_len * (4 + category_id_bytes(categories)) + OFFSET_PROFILE_BYTES,
                     SAMPLE_ROW_BYTES, k * 12 + 4 + recent_len * 4, seq_len * 8 + COPY_ROW_BYTES)


def layout_rows(seq_lens: List[int], users: int, samples: Optional[int], categories: int, k: int,
                recent_len: int) -> List[LayoutRow]:
    n = samples if samples else users * SAMPLES_PER_USER
    return [layout_row(L, users, n, categories, k, recent_len) for L in seq_lens]


def _bytes_under(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def measured_layout(data_dir: str, meta: dict) -> Dict[str, object]:
    """On-disk bytes of a prepared dataset's stores, shards and retrievals, per sample and per user (local data)."""
    local = path_manager.get_local_path(data_dir)
    out: Dict[str, object] = {"splits": {}}
    for split, info in meta.get("splits", {}).items():
        store = _bytes_under(os.path.join(local, info["histories"])) if info.get("histories") else 0
        shards = sum(os.path.getsize(os.path.join(local, rel)) for rel in info["shards"])
        rows, users = int(info["rows"]), int(info.get("users_with_history", 0))
        out["splits"][split] = {"samples": rows, "users_with_history": users, "history_entries": info.get("history_entries"),
                                "history_store_bytes": store, "sample_shard_bytes": shards,
                                "bytes_per_sample": (store + shards) / max(1, rows),
                                "history_bytes_per_user": store / max(1, users)}
    retrievals = os.path.join(local, "retrieval")
    out["retrievals"] = {name: _bytes_under(os.path.join(retrievals, name))
                         for name in (sorted(os.listdir(retrievals)) if os.path.isdir(retrievals) else [])}
    return out
