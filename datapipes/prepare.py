"""``muse prepare``: the six raw Taobao-MM files -> vocabularies, multimodal table, joined shards.

Passes (memory bounded by batch, bucket and vocabulary sizes, never by a file's size):
1. Open and schema-check all six files; sha256 of each.
2. Stream every file once, validating it, and count ids per id space (``IdCounter``: per-chunk
   ``np.unique``, hash-partitioned, spilled past a budget).
3. Build the vocabularies (items: those covering ``item_coverage`` of history interactions, plus every
   target item), the item side arrays (category/city/province per item index) and ``mm_table.npy``.
4. Per split, an external hash join of samples with user features: both sides are remapped and spilled
   into B buckets by user index, then joined bucket by bucket, shuffled within the bucket, and written as
   shards of ``shard_rows`` rows.
Everything is written under a temp directory next to ``out`` and renamed into place at the end.
"""

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import UserError
from common.io import path_manager
from datapipes import schema as S
from datapipes.batch import PROFILE_FIELDS
from datapipes.counting import IdCounter
from datapipes.rawread import ListColumn, RawFile, sha256_file
from datapipes.shards import SAMPLE_SCHEMA, SHARD_SCHEMA, USER_SCHEMA, BucketSpill, ShardWriter, row_group_rows
from datapipes.tempdir import atomic_output_dir
from datapipes.vocab import Vocab, item_vocab, vocab_from_counter

SCHEMA_VERSION = 1
ITEM_ATTRIBUTES = "item_attributes.parquet"
ON_MISSING = ("drop", "pad")
_SPILL_BYTES = 1 << 30        # buffered rows of all buckets of one spill
_BUCKET_BYTES = 256 << 20     # target size of one bucket of remapped user features
_SLICE_BYTES = 128 << 20      # joined rows materialized at once


@dataclass(frozen=True)
class PrepareConfig:
    """Options of ``muse prepare``; see ``cli/prepare.py`` for their help."""

    raw: str
    out: str
    shard_rows: int = 65536
    item_coverage: float = 1.0
    on_missing: str = "drop"
    max_seq_len: Optional[int] = None
    buckets: Optional[int] = None
    seed: int = 0
    force: bool = False

    def validate(self) -> None:
        if self.shard_rows < 1:
            raise UserError(f"--shard-rows: must be at least 1, got {self.shard_rows}")
        if not 0.0 < self.item_coverage <= 1.0:
            raise UserError(f"--item-coverage: must be in (0, 1], got {self.item_coverage}")
        if self.on_missing not in ON_MISSING:
            raise UserError(f"--on-missing: must be one of {ON_MISSING}, got {self.on_missing!r}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise UserError(f"--max-seq-len: must be at least 1, got {self.max_seq_len}")
        if self.buckets is not None and self.buckets < 1:
            raise UserError(f"--buckets: must be at least 1, got {self.buckets}")
        if not path_manager.isdir(self.raw):
            raise UserError(f"--raw {self.raw}: not a directory")
        _check_out_spares_raw(self.raw, self.out)


def _local(path: str) -> Optional[str]:
    """Resolved local path (symlinks followed), or None for a non-local URI."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    return None if "://" in path else os.path.realpath(path)


def _check_out_spares_raw(raw: str, out: str) -> None:
    """``--out`` is replaced as a whole (``--force``), so it must not be ``--raw`` nor contain it.
    An ``--out`` inside ``--raw`` is allowed: replacing it never touches the raw files."""
    raw_path, out_path = _local(raw), _local(out)
    if raw_path is None or out_path is None:
        return
    if os.path.commonpath([raw_path, out_path]) == out_path:
        raise UserError(f"--out {out}: must not be --raw {raw} or contain it (it would be replaced)")


@dataclass
class SplitStats:
    """Join statistics of one split (samples x user features)."""

    sample_rows: int = 0
    rows_written: int = 0
    missing_user_dropped: int = 0
    missing_user_padded: int = 0
    unknown_target_dropped: int = 0
    unknown_target_padded: int = 0
    targets_without_item_features: int = 0
    targets_without_scl: int = 0
    user_feature_rows: int = 0
    user_feature_duplicates: int = 0
    user_rows_without_samples: int = 0
    history_entries: int = 0
    history_padding_removed: int = 0
    history_unknown_items_removed: int = 0
    history_rows_truncated: int = 0
    max_history_len: int = 0


@dataclass
class _ItemSide:
    """Per item index (row 0 = padding): remapped category, city, province; which rows have features."""

    cat: np.ndarray
    city: np.ndarray
    province: np.ndarray
    has_features: np.ndarray
    has_scl: np.ndarray


def _count_pass(files: Dict[str, RawFile], counters: Dict[str, IdCounter]) -> int:
    """Validate every file fully and count ids; returns the longest raw history list."""
    longest = 0
    for name in (S.TRAIN_SAMPLES, S.TEST_SAMPLES):
        for batch in files[name].batches([S.LABEL, S.USER, S.ITEM]):
            counters["user"].add(batch[S.USER])
            counters["target"].add(batch[S.ITEM])
    for name in (S.TRAIN_USER_FEATURES, S.TEST_USER_FEATURES):
        rf = files[name]
        start = 0
        for batch in rf.batches([S.USER, *S.PROFILE_COLUMNS, S.HIST_ITEMS, S.HIST_CATS]):
            items, cats = batch[S.HIST_ITEMS], batch[S.HIST_CATS]
            bad = np.flatnonzero(items.lengths != cats.lengths)
            if bad.size:
                r = int(bad[0])
                raise rf.fail(S.HIST_CATS, f"row {start + r} has {int(cats.lengths[r])} entries but {S.HIST_ITEMS} has {int(items.lengths[r])}")
            for field_name, column in zip(PROFILE_FIELDS, S.PROFILE_COLUMNS):
                counters[field_name].add(batch[column])
            counters["history"].add(items.values)
            counters["category"].add(cats.values)
            if items.lengths.size:
                longest = max(longest, int(items.lengths.max()))
            start += len(items.lengths)
    for batch in files[S.ITEM_FEATURES].batches([S.ITEM, S.CATEGORY, S.CITY, S.PROVINCE]):
        counters["category"].add(batch[S.CATEGORY])
        counters["item_city"].add(batch[S.CITY])
        counters["item_province"].add(batch[S.PROVINCE])
    for _ in files[S.SCL_EMBEDDINGS].batches([S.ITEM, S.EMBEDDING]):
        pass
    return longest


def _item_side(rf: RawFile, vocabs: Dict[str, Vocab]) -> Tuple[_ItemSide, Dict[str, int]]:
    n = vocabs["item"].size + 1
    side = _ItemSide(np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, bool),
                     np.ones(n, bool))
    rows_outside = duplicates = 0
    for batch in rf.batches([S.ITEM, S.CATEGORY, S.CITY, S.PROVINCE]):
        idx = vocabs["item"].lookup(batch[S.ITEM])
        sel = idx > 0
        rows_outside += int((~sel).sum())
        idx = idx[sel]
        duplicates += int(side.has_features[idx].sum()) + int(idx.size - np.unique(idx).size)
        side.cat[idx] = vocabs["category"].lookup(batch[S.CATEGORY][sel])
        side.city[idx] = vocabs["item_city"].lookup(batch[S.CITY][sel])
        side.province[idx] = vocabs["item_province"].lookup(batch[S.PROVINCE][sel])
        side.has_features[idx] = True
    side.has_features[0] = True
    stats = {"item_feature_rows_outside_vocab": rows_outside, "item_feature_duplicate_rows": duplicates,
             "vocab_items_without_item_features": int((~side.has_features).sum())}
    return side, stats


def _write_item_attributes(side: _ItemSide, path: str) -> None:
    n = side.cat.size
    table = pa.table({"index": np.arange(n, dtype=np.int64), "category": side.cat.astype(np.int64),
                      "item_city": side.city.astype(np.int64), "item_province": side.province.astype(np.int64)})
    with path_manager.open(path, "wb") as f:
        pq.write_table(table, f)


def _mm_table(rf: RawFile, item: Vocab, path: str, side: _ItemSide) -> Dict[str, int]:
    """Write int8 [V+1, 128] aligned with the item vocabulary (row 0 and items without SCL rows zero);
    marks the items that have an SCL row in ``side.has_scl``."""
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.int8, shape=(item.size + 1, S.MM_DIM))
    filled = np.zeros(item.size + 1, bool)
    rows_outside = 0
    for batch in rf.batches([S.ITEM, S.EMBEDDING]):
        idx = item.lookup(batch[S.ITEM])
        emb = batch[S.EMBEDDING].values.reshape(-1, S.MM_DIM)
        sel = idx > 0
        rows_outside += int((~sel).sum())
        table[idx[sel]] = emb[sel]
        filled[idx[sel]] = True
    table.flush()
    del table
    filled[0] = True
    side.has_scl = filled
    return {"scl_rows_outside_vocab": rows_outside, "vocab_items_without_scl": int(item.size - filled[1:].sum())}


def _remap_history(items: ListColumn, cats: ListColumn, vocabs: Dict[str, Vocab], max_len: Optional[int],
                   stats: SplitStats) -> Tuple[pa.Array, pa.Array]:
    """Remap and compact histories: padding (0) and items outside the vocab are removed, order kept
    (oldest -> newest), then each row keeps its ``max_len`` most recent entries."""
    n = items.lengths.size
    row = np.repeat(np.arange(n), items.lengths)
    item_idx = vocabs["item"].lookup(items.values)
    is_pad = items.values == 0
    keep = item_idx > 0
    stats.history_entries += int(items.values.size)
    stats.history_padding_removed += int(is_pad.sum())
    stats.history_unknown_items_removed += int((~keep & ~is_pad).sum())
    lengths = np.bincount(row[keep], minlength=n)
    if max_len is not None:
        kept_row = row[keep]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        from_end = lengths[kept_row] - 1 - (np.arange(kept_row.size) - offsets[kept_row])
        recent = np.zeros(keep.size, bool)
        recent[np.flatnonzero(keep)] = from_end < max_len
        stats.history_rows_truncated += int((lengths > max_len).sum())
        keep = recent
        lengths = np.minimum(lengths, max_len)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    if lengths.size:
        stats.max_history_len = max(stats.max_history_len, int(lengths.max()))
    cat_idx = vocabs["category"].lookup(cats.values[keep])
    return (pa.ListArray.from_arrays(offsets, pa.array(item_idx[keep].astype(np.int32))),
            pa.ListArray.from_arrays(offsets, pa.array(cat_idx.astype(np.int32))))


def _spill_user_features(rf: RawFile, vocabs, max_len, spill: BucketSpill, stats: SplitStats) -> None:
    for batch in rf.batches([S.USER, *S.PROFILE_COLUMNS, S.HIST_ITEMS, S.HIST_CATS]):
        user = vocabs["user"].lookup(batch[S.USER])
        stats.user_feature_rows += int(user.size)
        sel = user > 0
        stats.user_rows_without_samples += int((~sel).sum())
        hist_items, hist_cats = _remap_history(batch[S.HIST_ITEMS], batch[S.HIST_CATS], vocabs, max_len, stats)
        cols = {"user": pa.array(user)}
        for field_name, column in zip(PROFILE_FIELDS, S.PROFILE_COLUMNS):
            cols[field_name] = pa.array(vocabs[field_name].lookup(batch[column]))
        cols["hist_items"], cols["hist_cats"] = hist_items, hist_cats
        table = pa.table(cols, schema=USER_SCHEMA).filter(pa.array(sel))
        spill.add(table, user[sel] % spill.buckets)


def _spill_samples(rf: RawFile, vocabs, spill: BucketSpill, stats: SplitStats) -> None:
    for batch in rf.batches([S.LABEL, S.USER, S.ITEM]):
        user = vocabs["user"].lookup(batch[S.USER])
        label = batch[S.LABEL].values.reshape(-1, S.LABEL_WIDTH)[:, 1].astype(np.int8)
        target = vocabs["item"].lookup(batch[S.ITEM])
        stats.sample_rows += int(user.size)
        spill.add(pa.table({"label": label, "user": user, "target_item": target}, schema=SAMPLE_SCHEMA), user % spill.buckets)


def _empty_user_row() -> pa.Table:
    cols = {"user": pa.array([0], pa.int64())}
    for f in PROFILE_FIELDS:
        cols[f] = pa.array([0], pa.int64())
    cols["hist_items"] = pa.array([[]], pa.list_(pa.int32()))
    cols["hist_cats"] = pa.array([[]], pa.list_(pa.int32()))
    return pa.table(cols, schema=USER_SCHEMA)


def _join_bucket(samples: pa.Table, users: pa.Table, side: _ItemSide, cfg: PrepareConfig, rng: np.random.Generator,
                 writer: ShardWriter, slice_rows: int, stats: SplitStats) -> None:
    uf_user = users.column("user").to_numpy()
    uniq, first = np.unique(uf_user, return_index=True)
    stats.user_feature_duplicates += int(uf_user.size - uniq.size)
    s_user = samples.column("user").to_numpy()
    target = samples.column("target_item").to_numpy()
    if uniq.size:
        pos = np.minimum(np.searchsorted(uniq, s_user), uniq.size - 1)
        found = (uniq[pos] == s_user) & (s_user > 0)
        row = np.where(found, first[pos], users.num_rows)
    else:
        found = np.zeros(s_user.size, bool)
        row = np.full(s_user.size, users.num_rows)
    unknown = target == 0
    if cfg.on_missing == "drop":
        stats.missing_user_dropped += int((~found).sum())
        stats.unknown_target_dropped += int(unknown.sum())
        keep = np.flatnonzero(found & ~unknown)
    else:
        stats.missing_user_padded += int((~found).sum())
        stats.unknown_target_padded += int(unknown.sum())
        keep = np.arange(s_user.size)
    keep = keep[rng.permutation(keep.size)]
    users = pa.concat_tables([users, _empty_user_row()]).combine_chunks()
    labels = samples.column("label").to_numpy()
    for start in range(0, keep.size, slice_rows):
        idx = keep[start:start + slice_rows]
        joined = users.take(pa.array(row[idx]))
        t = target[idx]
        stats.targets_without_item_features += int((~side.has_features[t]).sum())
        stats.targets_without_scl += int((~side.has_scl[t]).sum())
        cols = {"label": pa.array(labels[idx]), "user": pa.array(s_user[idx])}
        for f in PROFILE_FIELDS:
            cols[f] = joined.column(f)
        cols.update(target_item=pa.array(t), target_cat=pa.array(side.cat[t].astype(np.int64)),
                    item_city=pa.array(side.city[t].astype(np.int64)),
                    item_province=pa.array(side.province[t].astype(np.int64)), hist_items=joined.column("hist_items"),
                    hist_cats=joined.column("hist_cats"))
        writer.write(pa.table(cols, schema=SHARD_SCHEMA))
        stats.rows_written += idx.size


def _auto_buckets(rf: RawFile) -> int:
    decoded = rf.bytes_per_row([S.HIST_ITEMS, S.HIST_CATS]) * rf.num_rows / 2  # int64 -> int32 after remap
    return int(min(4096, max(1, math.ceil(decoded / _BUCKET_BYTES))))


def _prepare_split(split: str, files: Dict[str, RawFile], vocabs, side: _ItemSide, cfg: PrepareConfig,
                   longest: int, root: str, work: str) -> Tuple[SplitStats, List[Tuple[str, int]]]:
    samples_file, users_file = (files[f] for f in S.SPLIT_FILES[split])
    buckets = cfg.buckets or _auto_buckets(users_file)
    max_len = min(longest, cfg.max_seq_len) if cfg.max_seq_len else longest
    user_row_bytes = 8 * max(1, max_len) + 64
    stats = SplitStats()
    user_spill = BucketSpill(work, f"{split}-users", buckets, USER_SCHEMA, _SPILL_BYTES // buckets // user_row_bytes)
    sample_spill = BucketSpill(work, f"{split}-samples", buckets, SAMPLE_SCHEMA, _SPILL_BYTES // buckets // 24)
    _spill_user_features(users_file, vocabs, cfg.max_seq_len, user_spill, stats)
    user_spill.close()
    _spill_samples(samples_file, vocabs, sample_spill, stats)
    sample_spill.close()
    writer = ShardWriter(root, split, cfg.shard_rows, row_group_rows(max_len))
    slice_rows = int(max(1, min(cfg.shard_rows, _SLICE_BYTES // user_row_bytes)))
    for b in range(buckets):
        rng = np.random.default_rng([cfg.seed, S.SPLITS.index(split), b])
        _join_bucket(sample_spill.read(b), user_spill.read(b), side, cfg, rng, writer, slice_rows, stats)
    return stats, writer.close()


def _counters(work: str) -> Dict[str, IdCounter]:
    # Item counters see billions of history entries at full scale: many partitions keep each
    # partition's merge small; both must share the partitioning (item_vocab zips them).
    big = ("history", "target")
    spaces = ("user", *big, "category", *PROFILE_FIELDS, "item_city", "item_province")
    return {s: IdCounter(work, s, partitions=256 if s in big else 16, budget_pairs=16_000_000 if s in big else 4_000_000)
            for s in spaces}


def _build_vocabs(counters: Dict[str, IdCounter], coverage: float, root: str) -> Tuple[Dict[str, Vocab], Dict[str, float]]:
    """All vocabularies, written to ``root/vocab/<space>.parquet``; plus the item coverage statistics."""
    vocabs: Dict[str, Vocab] = {}
    vocabs["item"], coverage_stats = item_vocab(counters["history"], counters["target"], coverage)
    for space in S.ID_SPACES:
        if space != "item":
            vocabs[space] = vocab_from_counter(counters[space])
    path_manager.mkdirs(os.path.join(root, "vocab"))
    for space, vocab in vocabs.items():
        vocab.write(os.path.join(root, "vocab", f"{space}.parquet"))
    return vocabs, coverage_stats


def _write_dataset(cfg: PrepareConfig, files: Dict[str, RawFile], root: str) -> dict:
    work = os.path.join(root, "_work")
    os.makedirs(work)
    sources = {name: sha256_file(rf.path) for name, rf in files.items()}
    counters = _counters(work)
    longest = _count_pass(files, counters)
    vocabs, coverage = _build_vocabs(counters, cfg.item_coverage, root)
    del counters
    side, item_stats = _item_side(files[S.ITEM_FEATURES], vocabs)
    _write_item_attributes(side, os.path.join(root, ITEM_ATTRIBUTES))
    item_stats.update(_mm_table(files[S.SCL_EMBEDDINGS], vocabs["item"], os.path.join(root, "mm_table.npy"), side))
    splits, join_stats = {}, {"items": item_stats}
    for split in S.SPLITS:
        stats, shards = _prepare_split(split, files, vocabs, side, cfg, longest, root, work)
        join_stats[split] = asdict(stats)
        splits[split] = {"rows": stats.rows_written, "shards": [rel for rel, _ in shards],
                         "shard_rows": [n for _, n in shards]}
    shutil.rmtree(work)
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "vocab_sizes": {space: vocabs[space].size for space in S.ID_SPACES},
        "max_seq_len": max(join_stats[split]["max_history_len"] for split in S.SPLITS),
        "recent_len": S.RECENT_LEN, "mm_dim": S.MM_DIM, "mm_dtype": "int8",
        "splits": splits, "join_stats": join_stats, "item_coverage": coverage, "sources": sources,
        "options": {"shard_rows": cfg.shard_rows, "item_coverage": cfg.item_coverage, "on_missing": cfg.on_missing,
                    "max_seq_len": cfg.max_seq_len, "buckets": cfg.buckets, "seed": cfg.seed},
    }
    with path_manager.open(os.path.join(root, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=1)
    return metadata


def prepare(cfg: PrepareConfig) -> dict:
    """Validate, count, build vocabularies and the multimodal table, join and shard; returns the
    metadata written to ``out/metadata.json``. Nothing appears at ``cfg.out`` unless all of it succeeds."""
    cfg.validate()
    files: Dict[str, RawFile] = {}
    try:
        for name in S.RAW_FILES:
            files[name] = RawFile(cfg.raw, name)
        with atomic_output_dir(cfg.out, force=cfg.force, flag="--out") as root:
            return _write_dataset(cfg, files, root)
    finally:
        for rf in files.values():
            rf.close()
