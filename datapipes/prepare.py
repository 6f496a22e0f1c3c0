"""``muse prepare``: the six raw Taobao-MM files -> vocabularies, multimodal table, history stores, sample shards.

Passes (memory bounded by batch, bucket and vocabulary sizes, never by a file's size):
1. Open and schema-check all six files; sha256 of each.
2. Stream every file once, validating it, and count ids per id space (``IdCounter``: per-chunk
   ``np.unique``, hash-partitioned, spilled past a budget).
3. Build the vocabularies (items: those covering ``item_coverage`` of history interactions, plus every
   target item), the item side arrays (category/city/province per item index) and ``mm_table.npy``.
4. Per split: the user features are streamed into the split's history store (``datapipes.histories``: each
   user's history and profile once, keyed by user index); the samples are spilled into B buckets by user index,
   shuffled within the bucket and written as shards of ``shard_rows`` rows holding only the user index, the
   target and its attributes, the label and ``history_end`` (-1: the sample sees its user's whole history).
   No join is needed: a sample reaches its history through its user index.
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
from datapipes.histories import STORE_DIR, HistoryWriter
from datapipes.shards import SAMPLE_GROUP_ROWS, SAMPLE_SCHEMA, SHARD_SCHEMA, BucketSpill, ShardWriter
from datapipes.tempdir import atomic_output_dir
from datapipes.vocab import Vocab, fingerprint, item_vocab, vocab_from_counter

SCHEMA_VERSION = 2
ITEM_ATTRIBUTES = "item_attributes.parquet"
ON_MISSING = ("drop", "pad")
_SPILL_BYTES = 1 << 30        # buffered rows of all buckets of one spill
_BUCKET_BYTES = 256 << 20     # sample buckets: as many as 256 MB pieces of the remapped user features (see _auto_buckets)


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
    history_unknown_items_kept: int = 0
    history_unknown_removed: int = 0
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
                   stats: SplitStats) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remap and compact histories, order kept (oldest -> newest): padding (raw item 0) is removed; an item outside
    the vocabulary keeps its position as item 0 with its category (removed only when the category is unknown too);
    then each row keeps its ``max_len`` most recent entries. Returns int64 [n] lengths and the kept entries'
    int32 item and category indices, row after row."""
    n = items.lengths.size
    row = np.repeat(np.arange(n), items.lengths)
    item_idx = vocabs["item"].lookup(items.values)
    cat_idx = vocabs["category"].lookup(cats.values)
    is_pad = items.values == 0
    unknown_item = ~is_pad & (item_idx == 0)
    keep = ~is_pad & ((item_idx > 0) | (cat_idx > 0))
    stats.history_entries += int(items.values.size)
    stats.history_padding_removed += int(is_pad.sum())
    stats.history_unknown_items_kept += int((unknown_item & keep).sum())
    stats.history_unknown_removed += int((unknown_item & ~keep).sum())
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
    if lengths.size:
        stats.max_history_len = max(stats.max_history_len, int(lengths.max()))
    return lengths.astype(np.int64), item_idx[keep].astype(np.int32), cat_idx[keep].astype(np.int32)


def _write_histories(rf: RawFile, vocabs, max_len, store: HistoryWriter, stats: SplitStats) -> None:
    """Every user-features row of a user with samples -> the store, once per user (the first row in file order
    wins; later rows of the same user are counted as duplicates)."""
    for batch in rf.batches([S.USER, *S.PROFILE_COLUMNS, S.HIST_ITEMS, S.HIST_CATS]):
        user = vocabs["user"].lookup(batch[S.USER])
        stats.user_feature_rows += int(user.size)
        lengths, items, cats = _remap_history(batch[S.HIST_ITEMS], batch[S.HIST_CATS], vocabs, max_len, stats)
        known = user > 0
        stats.user_rows_without_samples += int((~known).sum())
        first = np.zeros(user.size, bool)
        first[np.unique(user, return_index=True)[1]] = True
        keep = known & first & ~store.seen[user]
        stats.user_feature_duplicates += int((known & ~keep).sum())
        entry_kept = np.repeat(keep, lengths)
        profile = np.stack([vocabs[f].lookup(batch[c]) for f, c in zip(PROFILE_FIELDS, S.PROFILE_COLUMNS)], axis=1)
        store.add(user[keep], lengths[keep], items[entry_kept], cats[entry_kept], profile[keep])


def _spill_samples(rf: RawFile, vocabs, spill: BucketSpill, stats: SplitStats) -> None:
    for batch in rf.batches([S.LABEL, S.USER, S.ITEM]):
        user = vocabs["user"].lookup(batch[S.USER])
        label = batch[S.LABEL].values.reshape(-1, S.LABEL_WIDTH)[:, 1].astype(np.int8)
        target = vocabs["item"].lookup(batch[S.ITEM])
        stats.sample_rows += int(user.size)
        spill.add(pa.table({"label": label, "user": user, "target_item": target}, schema=SAMPLE_SCHEMA), user % spill.buckets)


def _write_bucket(samples: pa.Table, has_history: np.ndarray, side: _ItemSide, cfg: PrepareConfig,
                  rng: np.random.Generator, writer: ShardWriter, stats: SplitStats) -> None:
    """One bucket of samples (every sample of its users), shuffled, with the target's attributes -> shards."""
    s_user = samples.column("user").to_numpy()
    target = samples.column("target_item").to_numpy()
    found = has_history[s_user] & (s_user > 0)
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
    t = target[keep]
    stats.targets_without_item_features += int((~side.has_features[t]).sum())
    stats.targets_without_scl += int((~side.has_scl[t]).sum())
    writer.write(pa.table({
        "label": samples.column("label").to_numpy()[keep], "user": s_user[keep], "target_item": t,
        "target_cat": side.cat[t].astype(np.int64), "item_city": side.city[t].astype(np.int64),
        "item_province": side.province[t].astype(np.int64),
        "history_end": np.full(keep.size, -1, np.int64)}, schema=SHARD_SCHEMA))
    stats.rows_written += int(keep.size)


def _auto_buckets(rf: RawFile) -> int:
    """Sample buckets of a split: as many as the per-sample-history layout joined in (one per ~256 MB of decoded
    user features), so a dataset prepared again gets its rows in the same order; a bucket's samples (24 bytes
    each in the spill) are always far smaller than that."""
    decoded = rf.bytes_per_row([S.HIST_ITEMS, S.HIST_CATS]) * rf.num_rows / 2  # int64 -> int32 after remap
    return int(min(4096, max(1, math.ceil(decoded / _BUCKET_BYTES))))


def _prepare_split(split: str, files: Dict[str, RawFile], vocabs, side: _ItemSide, cfg: PrepareConfig,
                   root: str, work: str, fingerprint: str) -> Tuple[SplitStats, List[Tuple[str, int]], Dict[str, int]]:
    """The split's history store, then its sample shards. Samples are bucketed by user and shuffled within the
    bucket (seeded by seed, split, bucket) exactly as the per-sample-history layout was, so the same raw data
    and seed give the same rows in the same order."""
    samples_file, users_file = (files[f] for f in S.SPLIT_FILES[split])
    stats = SplitStats()
    store = HistoryWriter(os.path.join(root, split, STORE_DIR), vocabs["user"].size, vocabs["item"].size,
                          vocabs["category"].size, fingerprint, split)
    _write_histories(users_file, vocabs, cfg.max_seq_len, store, stats)
    store_stats = store.close()
    buckets = cfg.buckets or _auto_buckets(users_file)
    sample_spill = BucketSpill(work, f"{split}-samples", buckets, SAMPLE_SCHEMA, _SPILL_BYTES // buckets // 24)
    _spill_samples(samples_file, vocabs, sample_spill, stats)
    sample_spill.close()
    writer = ShardWriter(root, split, cfg.shard_rows, SAMPLE_GROUP_ROWS)
    for b in range(buckets):
        rng = np.random.default_rng([cfg.seed, S.SPLITS.index(split), b])
        _write_bucket(sample_spill.read(b), store.seen, side, cfg, rng, writer, stats)
    return stats, writer.close(), store_stats


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
    _count_pass(files, counters)
    vocabs, coverage = _build_vocabs(counters, cfg.item_coverage, root)
    del counters
    vocab_fingerprint = fingerprint(vocabs)
    side, item_stats = _item_side(files[S.ITEM_FEATURES], vocabs)
    _write_item_attributes(side, os.path.join(root, ITEM_ATTRIBUTES))
    mm_path = os.path.join(root, "mm_table.npy")
    item_stats.update(_mm_table(files[S.SCL_EMBEDDINGS], vocabs["item"], mm_path, side))
    splits, join_stats = {}, {"items": item_stats}
    for split in S.SPLITS:
        stats, shards, store = _prepare_split(split, files, vocabs, side, cfg, root, work, vocab_fingerprint)
        join_stats[split] = asdict(stats)
        splits[split] = {"rows": stats.rows_written, "shards": [rel for rel, _ in shards],
                         "shard_rows": [n for _, n in shards], "histories": f"{split}/{STORE_DIR}",
                         "history_entries": store["entries"], "users_with_history": store["users_with_features"]}
    shutil.rmtree(work)
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "vocab_sizes": {space: vocabs[space].size for space in S.ID_SPACES},
        "max_seq_len": max(join_stats[split]["max_history_len"] for split in S.SPLITS),
        "recent_len": S.RECENT_LEN, "mm_dim": S.MM_DIM, "mm_dtype": "int8",
        "vocab_fingerprint": vocab_fingerprint, "mm_table_sha256": sha256_file(mm_path),
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
