"""A prepared dataset directory (written by ``muse prepare``): metadata, vocabularies, multimodal table,
per-user history stores and sample shards of the train and test splits.

Layout::

    metadata.json            schema_version, vocab_sizes, vocab_fingerprint, max_seq_len, recent_len, mm_dim,
                             mm_dtype, mm_table_sha256, splits {split: {rows, shards, shard_rows, histories, ...}},
                             join_stats, sources, ...
    mm_table.npy             int8 [V_item + 1, 128], row 0 zeros, aligned with vocab/item.parquet
    vocab/<space>.parquet    id (raw hashed), index (1..V), count
    item_attributes.parquet  per item index 0..V_item: category, item_city, item_province (remapped; 0 unknown)
    <split>/histories/       the split's history store, once per user (``datapipes.histories``)
    <split>/part-NNNNN.parquet   samples: label, user, target_item, target_cat, item_city, item_province, history_end
    retrieval/<name>/        stored GSU results (``muse retrieve``; ``retrieval.store``), optional
"""

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np
import pyarrow.parquet as pq

from common.errors import DataError, UserError
from common.io import path_manager
from datapipes import schema as S
from datapipes.histories import HistoryStore
from datapipes.vocab import Vocab

SUPPORTED_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class SplitInfo:
    """One split: total rows, shard paths relative to the dataset root, rows per shard, history store path."""

    rows: int
    shards: List[str]
    shard_rows: List[int]
    histories: str = ""


@dataclass(frozen=True)
class Metadata:
    """The parsed ``metadata.json``. ``vocab_sizes[space]`` is the number of real ids (table rows = size + 1)."""

    schema_version: int
    vocab_sizes: Dict[str, int]
    max_seq_len: int
    recent_len: int
    mm_dim: int
    mm_dtype: str
    splits: Dict[str, SplitInfo]
    vocab_fingerprint: str = ""
    mm_table_sha256: str = ""
    join_stats: Dict[str, Any] = field(default_factory=dict)
    sources: Dict[str, str] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict, where: str) -> "Metadata":
        try:
            version = int(data["schema_version"])
            if version != SUPPORTED_SCHEMA_VERSION:
                raise DataError(f"{where}: schema_version: {version} is not supported (expected {SUPPORTED_SCHEMA_VERSION}; "
                                "run `muse prepare` again)")
            missing = [s for s in S.ID_SPACES if s not in data["vocab_sizes"]]
            if missing:
                raise DataError(f"{where}: vocab_sizes: missing {', '.join(missing)}")
            splits = {name: SplitInfo(int(info["rows"]), list(info["shards"]),
                                      [int(n) for n in info.get("shard_rows", [])], str(info["histories"]))
                      for name, info in data["splits"].items()}
            known = {"schema_version", "vocab_sizes", "max_seq_len", "recent_len", "mm_dim", "mm_dtype", "splits",
                     "join_stats", "sources", "vocab_fingerprint", "mm_table_sha256"}
            return cls(schema_version=version, vocab_sizes={k: int(v) for k, v in data["vocab_sizes"].items()},
                       max_seq_len=int(data["max_seq_len"]), recent_len=int(data["recent_len"]),
                       mm_dim=int(data["mm_dim"]), mm_dtype=str(data["mm_dtype"]), splits=splits,
                       vocab_fingerprint=str(data["vocab_fingerprint"]), mm_table_sha256=str(data["mm_table_sha256"]),
                       join_stats=data.get("join_stats", {}), sources=data.get("sources", {}),
                       extra={k: v for k, v in data.items() if k not in known})
        except KeyError as err:
            raise DataError(f"{where}: {err.args[0]}: missing key") from None
        except (TypeError, ValueError) as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{where}: (file): malformed metadata: {err}") from None


class PreparedDataset:
    """Read access to a prepared dataset directory (local path or any iopath URI)."""

    def __init__(self, root: str, metadata: Metadata):
        self.root = root
        self.metadata = metadata
        self._vocabs: Dict[str, Vocab] = {}

    @classmethod
    def open(cls, path: str) -> "PreparedDataset":
        meta_path = os.path.join(path, "metadata.json")
        if not path_manager.exists(meta_path):
            raise UserError(f"{path}: not a prepared dataset (no metadata.json; run `muse prepare`)")
        try:
            with path_manager.open(meta_path, "r") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise DataError(f"{meta_path}: (file): not valid JSON: {err}") from None
        return cls(path, Metadata.from_json(data, meta_path))

    def mm_table(self) -> np.ndarray:
        """The frozen multimodal table, int8 [V_item + 1, mm_dim], memory-mapped read-only."""
        path = path_manager.get_local_path(os.path.join(self.root, "mm_table.npy"))
        table = np.load(path, mmap_mode="r")
        expected = (self.metadata.vocab_sizes["item"] + 1, self.metadata.mm_dim)
        if table.shape != expected or table.dtype != np.int8:
            raise DataError(f"{path}: (file): shape {table.shape} {table.dtype}, expected {expected} int8")
        return table

    def vocab(self, space: str) -> Vocab:
        """Raw hashed id <-> index mapping of one id space (``Vocab.lookup(raw) -> index``)."""
        if space not in S.ID_SPACES:
            raise ValueError(f"space: {space!r} is not one of {S.ID_SPACES}")
        if space not in self._vocabs:
            self._vocabs[space] = Vocab.read(os.path.join(self.root, "vocab", f"{space}.parquet"))
        return self._vocabs[space]

    def item_attributes(self) -> Dict[str, np.ndarray]:
        """int64 [V_item + 1] arrays "category", "item_city", "item_province" indexed by item index
        (from item_features; 0 = unknown or no item_features row)."""
        path = os.path.join(self.root, "item_attributes.parquet")
        with path_manager.open(path, "rb") as f:
            table = pq.read_table(f)
        n = self.metadata.vocab_sizes["item"] + 1
        if table.num_rows != n:
            raise DataError(f"{path}: (file): {table.num_rows} rows, expected {n} (item vocabulary + padding)")
        return {name: table.column(name).to_numpy() for name in ("category", "item_city", "item_province")}

    def histories(self, split: str) -> HistoryStore:
        """The split's per-user history store, memory-mapped (checked against this dataset's vocabulary)."""
        info = self.split(split)
        return HistoryStore.open(os.path.join(self.root, info.histories), fingerprint=self.metadata.vocab_fingerprint,
                                 num_users=self.metadata.vocab_sizes["user"], local_path=path_manager.get_local_path)

    def split(self, split: str) -> SplitInfo:
        if split not in self.metadata.splits:
            raise UserError(f"split {split!r}: not in {self.root} (has {', '.join(self.metadata.splits)})")
        return self.metadata.splits[split]

    def shards(self, split: str) -> List[str]:
        """Paths (root-joined) of the split's shard files, in order."""
        return [os.path.join(self.root, rel) for rel in self.split(split).shards]

    def shard_rows(self, split: str) -> List[int]:
        """Rows of each shard: from metadata.json, else from the parquet footers. Checks every shard exists."""
        info = self.split(split)
        paths = self.shards(split)
        for path in paths:
            if not path_manager.exists(path):
                raise DataError(f"{path}: (file): shard listed in metadata.json is missing")
        if len(info.shard_rows) == len(paths):
            return list(info.shard_rows)
        rows = []
        for path in paths:
            with path_manager.open(path, "rb") as f:
                rows.append(pq.ParquetFile(f).metadata.num_rows)
        return rows
