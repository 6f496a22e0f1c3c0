"""Synthetic data in the exact Taobao-MM raw schema, with a planted lifelong-interest signal.

Generative story (all deterministic per seed):
- Items belong to latent semantic clusters; popularity is Zipf-like (long tail) within and across clusters.
  An item's category is one of its cluster's categories (with some noise), and its 128-d content
  (SCL) embedding is the cluster centroid plus noise, quantized as trunc(clip(x, -1, 1) * 127).
- Each user has a few lifelong interest clusters. The older part of the behavior sequence mixes all of
  them; the most recent 50 behaviors come only from a subset (the "current" interests); a fraction of
  every sequence is random noise.
- A sample's click probability is sigmoid(a * [target cluster in lifelong interests] +
  b * [target cluster in current interests] + c): targets that match an interest visible only in the
  old part of the history are clicked far more often than random ones, which only a model reading the
  whole sequence (e.g. MUSE's cosine top-K over content embeddings) can tell apart; DIN sees only the
  recent 50. Tail items are rare in training, so their ID embeddings are poor while content helps.
- Optionally (``RawContentConfig``, on for ``muse synth``), ``raw_content.parquet``: each item's raw content
  vector, a noisy higher-dimensional view of its semantics as an encoder of text/images would give it: a
  random linear lift of (centroid + noise) to ``dim`` dimensions, plus a "style" vector shared by items of
  all clusters (content similarity that says nothing about behavior), plus isotropic noise. ``muse pretrain``
  learns the 128-d table from it; the six release files are the same with or without it.
"""

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import UserError
from common.io import path_manager
from datapipes import schema as S
from datapipes.tempdir import atomic_output_dir


@dataclass(frozen=True)
class SynthConfig:
    """Sizes and signal strengths of the synthetic dataset."""

    users: int = 2000
    items: int = 10000
    samples: int = 20000
    seq_len: int = 1000
    categories: int = 64
    clusters: int = 20
    seed: int = 0
    test_fraction: float = 0.2
    interests: int = 3            # lifelong interest clusters per user
    recent_interests: int = 1     # of which the recent 50 behaviors cover only this many
    noise: float = 0.1            # fraction of history behaviors from a uniformly random cluster
    zipf: float = 1.1             # item popularity exponent
    embedding_noise: float = 0.8  # content-embedding noise relative to the unit centroid
    unpadded_fraction: float = 0.1  # user rows whose history is shorter than seq_len and not padded
    scl_missing: float = 0.02     # items with no SCL embedding row
    click_lifelong: float = 3.0   # a
    click_recent: float = 1.0     # b
    click_bias: float = -2.0      # c

    def validate(self) -> None:
        for name in ("users", "items", "samples", "seq_len", "categories", "clusters"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.seq_len > 100_000:
            raise UserError(f"--seq-len: at most 100000, got {self.seq_len}")
        if self.samples < 2:
            raise UserError(f"--samples: need at least 2 (train and test), got {self.samples}")
        if self.clusters > self.items:
            raise UserError(f"--clusters: {self.clusters} exceeds --items {self.items}")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"--test-fraction: must be in (0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class RawContentConfig:
    """The raw content file ``raw_content.parquet`` (columns ``205`` item id, ``content`` list<float32> of ``dim``)."""

    dim: int = 256
    semantic_noise: float = 1.0   # per-item noise around the cluster centroid (relative to the unit centroid)
    styles: int = 8               # style vectors, assigned to items independently of their cluster
    style: float = 1.0            # norm of the style vector (the lifted semantics have norm ~1)
    noise: float = 0.5            # norm of the isotropic observation noise

    def validate(self) -> None:
        if self.dim < 1:
            raise UserError(f"--raw-content-dim: must be at least 1 (or 0 for no raw content), got {self.dim}")
        if self.styles < 1:
            raise UserError(f"raw content styles: must be at least 1, got {self.styles}")


RAW_CONTENT = "raw_content.parquet"
RAW_CONTENT_COLUMN = "content"


def hashed_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct random nonzero int64 ids (negatives included), in random order."""
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        draw = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=n - out.size + 16, dtype=np.int64)
        merged = np.concatenate([out, draw[draw != 0]])
        _, first = np.unique(merged, return_index=True)
        out = merged[np.sort(first)]
    return out[:n]


@dataclass
class _World:
    """The latent structure: items (cluster, popularity, category...), users (interests, profile)."""

    item_ids: np.ndarray          # [I] hashed
    item_cluster: np.ndarray      # [I]
    item_cat: np.ndarray          # [I] hashed category id
    item_city: np.ndarray         # [I] hashed
    item_province: np.ndarray     # [I] hashed
    embeddings: np.ndarray        # [I, 128] int8
    centroids: np.ndarray         # [C, 128] unit cluster centroids
    by_cluster: np.ndarray        # [I] item indices sorted by cluster
    cum_pop: np.ndarray           # [I] cumulative popularity over by_cluster (normalized per cluster)
    cluster_start: np.ndarray     # [C] first position of each cluster in by_cluster
    cluster_size: np.ndarray      # [C]
    user_ids: np.ndarray          # [U] hashed
    interests: np.ndarray         # [U, interests] cluster ids, first `recent_interests` are current
    hist_len: np.ndarray          # [U] real history length
    unpadded: np.ndarray          # [U] bool
    profile: np.ndarray           # [U, 5] hashed


def _build_world(cfg: SynthConfig) -> _World:
    rng = np.random.default_rng([cfg.seed, 0])
    n_items, n_clusters = cfg.items, cfg.clusters
    # Every cluster gets at least one item.
    item_cluster = np.concatenate([np.arange(n_clusters), rng.integers(0, n_clusters, n_items - n_clusters)])
    rng.shuffle(item_cluster)
    popularity = 1.0 / np.arange(1, n_items + 1) ** cfg.zipf
    popularity = popularity[rng.permutation(n_items)]
    # Categories: cluster k owns categories {c : c % clusters == k}; noise picks any category.
    cat_hashes = hashed_ids(rng, cfg.categories)
    owned = [np.arange(k % cfg.categories, cfg.categories, n_clusters) if k < cfg.categories else np.array([k % cfg.categories])
             for k in range(n_clusters)]
    own_pick = np.array([owned[c][rng.integers(0, len(owned[c]))] for c in item_cluster])
    noisy = rng.random(n_items) < 0.1
    item_cat = np.where(noisy, rng.integers(0, cfg.categories, n_items), own_pick)
    city_hashes, province_hashes = hashed_ids(rng, 300), hashed_ids(rng, 34)
    item_city_idx = rng.integers(0, 300, n_items)
    centroids = rng.standard_normal((n_clusters, S.MM_DIM))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    raw = centroids[item_cluster] + cfg.embedding_noise * rng.standard_normal((n_items, S.MM_DIM)) / np.sqrt(S.MM_DIM)
    raw = raw / np.linalg.norm(raw, axis=1, keepdims=True) * 3.0
    embeddings = np.trunc(np.clip(raw, -1.0, 1.0) * 127).astype(np.int8)

    by_cluster = np.argsort(item_cluster, kind="stable")
    cluster_size = np.bincount(item_cluster, minlength=n_clusters)
    cluster_start = np.concatenate([[0], np.cumsum(cluster_size)[:-1]])
    pop_sorted = popularity[by_cluster]
    cum = np.cumsum(pop_sorted)
    seg_end = cum[cluster_start + cluster_size - 1]
    seg_begin = np.concatenate([[0.0], seg_end[:-1]])
    cluster_of_pos = item_cluster[by_cluster]
    cum_pop = (cum - seg_begin[cluster_of_pos]) / (seg_end - seg_begin)[cluster_of_pos]

    n_users = cfg.users
    k = min(cfg.interests, n_clusters)
    interests = np.stack([rng.choice(n_clusters, size=k, replace=False) for _ in range(n_users)])
    lo = min(cfg.seq_len, max(1, int(0.3 * cfg.seq_len)))
    hist_len = rng.integers(lo, cfg.seq_len + 1, n_users)
    unpadded = rng.random(n_users) < cfg.unpadded_fraction
    hist_len = np.where(unpadded, np.minimum(hist_len, max(1, cfg.seq_len - 1)), hist_len)
    cards = (9, 3, 300, 34, 12)
    profile = np.stack([hashed_ids(rng, c)[rng.integers(0, c, n_users)] for c in cards], axis=1)
    return _World(
        item_ids=hashed_ids(rng, n_items), item_cluster=item_cluster, item_cat=cat_hashes[item_cat],
        item_city=city_hashes[item_city_idx], item_province=province_hashes[item_city_idx % 34],
        embeddings=embeddings, centroids=centroids, by_cluster=by_cluster, cum_pop=cum_pop, cluster_start=cluster_start,
        cluster_size=cluster_size, user_ids=hashed_ids(rng, n_users), interests=interests,
        hist_len=hist_len, unpadded=unpadded, profile=profile)


def _sample_items(world: _World, rng: np.random.Generator, clusters: np.ndarray) -> np.ndarray:
    """Item indices drawn by popularity within each given cluster (any shape)."""
    u = rng.random(clusters.shape)
    offset = np.empty(clusters.shape, dtype=np.int64)
    flat_c, flat_u, flat_o = clusters.ravel(), u.ravel(), offset.reshape(-1)
    for c in np.unique(flat_c):
        sel = flat_c == c
        seg = world.cum_pop[world.cluster_start[c]: world.cluster_start[c] + world.cluster_size[c]]
        flat_o[sel] = np.minimum(np.searchsorted(seg, flat_u[sel], side="right"), world.cluster_size[c] - 1)
    return world.by_cluster[world.cluster_start[clusters] + offset]


def _write_table(path: str, table: pa.Table) -> None:
    with path_manager.open(path, "wb") as f:
        pq.write_table(table, f)


def _list_array(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _write_items(cfg: SynthConfig, world: _World, out: str) -> None:
    rng = np.random.default_rng([cfg.seed, 1])
    order = rng.permutation(cfg.items)
    _write_table(os.path.join(out, S.ITEM_FEATURES), pa.table({
        S.ITEM: world.item_ids[order], S.CATEGORY: world.item_cat[order],
        S.CITY: world.item_city[order], S.PROVINCE: world.item_province[order]}, schema=S.arrow_schema(S.ITEM_FEATURES)))
    keep = order[rng.random(cfg.items) >= cfg.scl_missing]
    emb = world.embeddings[keep]
    offsets = np.arange(len(keep) + 1) * S.MM_DIM
    _write_table(os.path.join(out, S.SCL_EMBEDDINGS), pa.table(
        {S.ITEM: world.item_ids[keep], S.EMBEDDING: _list_array(emb.reshape(-1), offsets)},
        schema=S.arrow_schema(S.SCL_EMBEDDINGS)))


def _write_raw_content(cfg: SynthConfig, content: RawContentConfig, world: _World, out: str) -> None:
    """``raw_content.parquet``: [I] rows in a random order, float32 vectors of ``content.dim``
    (own random stream, so the release files do not depend on it)."""
    rng = np.random.default_rng([cfg.seed, 4])
    n = cfg.items
    semantic = world.centroids[world.item_cluster] + content.semantic_noise * rng.standard_normal((n, S.MM_DIM)) / np.sqrt(S.MM_DIM)
    lift = rng.standard_normal((S.MM_DIM, content.dim)) / np.sqrt(content.dim)
    style_vectors = rng.standard_normal((content.styles, content.dim))
    style_vectors *= content.style / np.linalg.norm(style_vectors, axis=1, keepdims=True)
    vectors = (semantic @ lift + style_vectors[rng.integers(0, content.styles, n)]
               + content.noise * rng.standard_normal((n, content.dim)) / np.sqrt(content.dim)).astype(np.float32)
    order = rng.permutation(n)
    values = pa.FixedSizeListArray.from_arrays(pa.array(vectors[order].reshape(-1)), content.dim)
    _write_table(os.path.join(out, RAW_CONTENT), pa.table({S.ITEM: world.item_ids[order], RAW_CONTENT_COLUMN: values}))


def _write_samples(cfg: SynthConfig, world: _World, out: str) -> Tuple[np.ndarray, np.ndarray]:
    """Writes both sample files; returns the sets of user indices of the train and test samples."""
    rng = np.random.default_rng([cfg.seed, 2])
    n = cfg.samples
    # Mildly skewed user activity.
    activity = rng.gamma(2.0, 1.0, cfg.users)
    users = rng.choice(cfg.users, size=n, p=activity / activity.sum())
    interests = world.interests[users]
    r = cfg.recent_interests
    kind = rng.random(n)
    target_cluster = rng.integers(0, cfg.clusters, n)
    recent_pick = interests[np.arange(n), rng.integers(0, max(1, min(r, interests.shape[1])), n)]
    old_cols = interests.shape[1] - min(r, interests.shape[1])
    if old_cols > 0:
        lifelong_pick = interests[np.arange(n), min(r, interests.shape[1]) + rng.integers(0, old_cols, n)]
    else:
        lifelong_pick = recent_pick
    target_cluster = np.where(kind < 0.2, recent_pick, np.where(kind < 0.6, lifelong_pick, target_cluster))
    target = _sample_items(world, rng, target_cluster)
    in_long = (interests == target_cluster[:, None]).any(axis=1)
    in_recent = (interests[:, :r] == target_cluster[:, None]).any(axis=1)
    logit = cfg.click_bias + cfg.click_lifelong * in_long + cfg.click_recent * in_recent
    click = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    is_test = np.zeros(n, dtype=bool)
    is_test[rng.choice(n, size=max(1, min(n - 1, int(round(n * cfg.test_fraction)))), replace=False)] = True
    labels = np.stack([1 - click, click], axis=1).reshape(-1)
    for name, sel in ((S.TRAIN_SAMPLES, ~is_test), (S.TEST_SAMPLES, is_test)):
        idx = np.flatnonzero(sel)
        _write_table(os.path.join(out, name), pa.table({
            S.LABEL: _list_array(labels.reshape(-1, 2)[idx].reshape(-1), np.arange(len(idx) + 1) * 2),
            S.USER: world.user_ids[users[idx]], S.ITEM: world.item_ids[target[idx]]}, schema=S.arrow_schema(name)))
    return np.unique(users[~is_test]), np.unique(users[is_test])


def _history_chunk(cfg: SynthConfig, world: _World, users: np.ndarray, chunk: int) -> Dict[str, pa.Array]:
    """User-feature columns for the given user indices: [U] profile columns and list histories."""
    rng = np.random.default_rng([cfg.seed, 3, chunk])
    L = cfg.seq_len
    n_u = len(users)
    pos = np.arange(L)[None, :]
    real = pos >= (L - world.hist_len[users])[:, None]
    recent = pos >= L - S.RECENT_LEN
    interests = world.interests[users]
    r = max(1, min(cfg.recent_interests, interests.shape[1]))
    pick_recent = interests[np.arange(n_u)[:, None], rng.integers(0, r, (n_u, L))]
    pick_any = interests[np.arange(n_u)[:, None], rng.integers(0, interests.shape[1], (n_u, L))]
    clusters = np.where(recent, pick_recent, pick_any)
    clusters = np.where(rng.random((n_u, L)) < cfg.noise, rng.integers(0, cfg.clusters, (n_u, L)), clusters)
    items = _sample_items(world, rng, clusters)
    hist_items = np.where(real, world.item_ids[items], 0)
    hist_cats = np.where(real, world.item_cat[items], 0)
    keep = real | ~world.unpadded[users][:, None]
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    cols = {S.USER: pa.array(world.user_ids[users])}
    for i, c in enumerate(S.PROFILE_COLUMNS):
        cols[c] = pa.array(world.profile[users, i])
    cols[S.HIST_ITEMS] = _list_array(hist_items[keep], offsets)
    cols[S.HIST_CATS] = _list_array(hist_cats[keep], offsets)
    return cols


def _write_user_features(cfg: SynthConfig, world: _World, out: str, train_users: np.ndarray, test_users: np.ndarray) -> None:
    chunk_users = max(1, 2_000_000 // cfg.seq_len)
    wanted = {S.TRAIN_USER_FEATURES: np.zeros(cfg.users, bool), S.TEST_USER_FEATURES: np.zeros(cfg.users, bool)}
    wanted[S.TRAIN_USER_FEATURES][train_users] = True
    wanted[S.TEST_USER_FEATURES][test_users] = True
    files = {name: path_manager.open(os.path.join(out, name), "wb") for name in wanted}
    writers = {name: pq.ParquetWriter(f, S.arrow_schema(name)) for name, f in files.items()}
    try:
        for chunk, start in enumerate(range(0, cfg.users, chunk_users)):
            users = np.arange(start, min(cfg.users, start + chunk_users))
            users = users[wanted[S.TRAIN_USER_FEATURES][users] | wanted[S.TEST_USER_FEATURES][users]]
            if users.size == 0:
                continue
            table = pa.table(_history_chunk(cfg, world, users, chunk), schema=S.arrow_schema(S.TRAIN_USER_FEATURES))
            for name, writer in writers.items():
                mask = wanted[name][users]
                if mask.any():
                    writer.write_table(table.filter(pa.array(mask)))
    finally:
        for name in writers:
            writers[name].close()
            files[name].close()


def synthesize(cfg: SynthConfig, out: str, force: bool = False, raw_content: Optional[RawContentConfig] = None) -> Dict[str, int]:
    """Write the six raw files under ``out`` (atomically), and ``raw_content.parquet`` when ``raw_content``
    is given; returns row counts per file."""
    cfg.validate()
    if raw_content is not None:
        raw_content.validate()
    world = _build_world(cfg)
    with atomic_output_dir(out, force=force, flag="--out") as tmp:
        _write_items(cfg, world, tmp)
        train_users, test_users = _write_samples(cfg, world, tmp)
        _write_user_features(cfg, world, tmp, train_users, test_users)
        names = S.RAW_FILES
        if raw_content is not None:
            _write_raw_content(cfg, raw_content, world, tmp)
            names = names + (RAW_CONTENT,)
        counts = {name: pq.ParquetFile(os.path.join(tmp, name)).metadata.num_rows for name in names}
    return counts
