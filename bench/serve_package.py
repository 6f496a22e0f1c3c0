"""The own package of ``muse bench serve``: an untrained MUSE package of any table size, built in seconds.

Latency does not depend on the weights' values, so instead of synthesizing, preparing and training a run
(minutes, and a table no larger than the items the data happens to use), the benchmark writes the package
directly: a ``ModelConfig`` preset with its freshly initialised (seeded) weights, a multimodal table of
``items + 1`` int8 rows of width ``dim`` (clustered like the synthetic data's content embeddings: cluster
centroid plus noise, quantized as trunc(clip(x, -1, 1) * 127); row 0 zeros), random raw hashed ids for every id
space, item attributes, and a history store of ``users`` users with ``history`` behaviors each beside it
(``<package>.histories``, as ``muse export --histories`` writes it). The package is written by
``inference.export.write_package``, so it holds this project's predictor code like any export.

Histories draw items with Zipf-like popularity (exponent ``zipf`` over the whole table, popular items scattered
over the table), so a long history repeats popular items as real ones do; ``OwnPackage.distinct`` reports how
many distinct items each history holds (the multimodal GSU's work is C candidates x that many rows).
Disk: the table (items x dim bytes: 128 MB at 1M x 128), the item embedding table (items x id_dim x 4 bytes)
and the store (history x users x 8 bytes).
"""

import datetime
import os
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

from common.errors import UserError
from datapipes.batch import PROFILE_FIELDS
from datapipes.histories import HistoryWriter
from datapipes.tempdir import atomic_output_dir
from inference.checkpoint import model_state
from inference.export import histories_path, write_package
from inference.manifest import ENTRY_MODULE, FORMAT_VERSION
from model.config import ModelConfig
from model.muse import build_model

_ROW_CHUNK = 1 << 16
_SMALL_SPACES = {"category": 1000, "item_city": 300, "item_province": 32, **{f: 16 for f in PROFILE_FIELDS}}


@dataclass(frozen=True)
class OwnPackageConfig:
    """items: item vocabulary (table rows - 1); users, history: users in the store and behaviors each;
    model: a ``ModelConfig`` preset; dim: multimodal width; clusters: content clusters; zipf: popularity exponent."""

    items: int = 1_000_000
    users: int = 8
    history: int = 1000
    model: str = "muse"
    dim: int = 128
    clusters: int = 256
    zipf: float = 1.1
    seed: int = 0

    def validate(self) -> None:
        for flag, value in (("items", self.items), ("users", self.users), ("history", self.history)):
            if value < 1:
                raise UserError(f"--{flag}: must be >= 1 (got {value})")
        if self.clusters > self.items:
            raise UserError(f"--items: at least {self.clusters} for the benchmark's own package (got {self.items})")


@dataclass(frozen=True)
class OwnPackage:
    path: str
    table_rows: int
    distinct: List[int]  # distinct items of each user's history
    seconds: float


def raw_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct random positive int64 raw hashed ids, in vocabulary-index order (index i + 1 = ids[i])."""
    ids = np.unique(rng.integers(1, 2 ** 62, size=n + n // 100 + 16, dtype=np.int64))
    while ids.shape[0] < n:
        ids = np.unique(np.concatenate([ids, rng.integers(1, 2 ** 62, size=n, dtype=np.int64)]))
    return rng.permutation(ids)[:n]


def _vocab_blobs(space: str, ids: np.ndarray) -> Dict[str, torch.Tensor]:
    """``vocab.<space>.keys`` / ``.index`` as ``muse export`` writes them: raw ids sorted, their indices."""
    order = np.argsort(ids, kind="stable")
    return {f"vocab.{space}.keys": torch.from_numpy(ids[order].copy()),
            f"vocab.{space}.index": torch.from_numpy(order.astype(np.int64) + 1)}


def content_table(rng: np.random.Generator, cfg: OwnPackageConfig, cluster: np.ndarray) -> torch.Tensor:
    """int8 [items + 1, dim]: centroid of the item's cluster plus noise, quantized; row 0 zeros."""
    centroids = rng.standard_normal((cfg.clusters, cfg.dim), dtype=np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    table = np.zeros((cfg.items + 1, cfg.dim), dtype=np.int8)
    scale = np.float32(0.8 / np.sqrt(cfg.dim))
    for start in range(1, cfg.items + 1, _ROW_CHUNK):
        end = min(cfg.items + 1, start + _ROW_CHUNK)
        values = centroids[cluster[start:end]] + scale * rng.standard_normal((end - start, cfg.dim), dtype=np.float32)
        table[start:end] = np.trunc(np.clip(values, -1.0, 1.0) * 127.0).astype(np.int8)
    return torch.from_numpy(table)


def histories(rng: np.random.Generator, cfg: OwnPackageConfig) -> np.ndarray:
    """int64 [users, history] item indices: Zipf-like popularity over all items, popular items scattered."""
    weights = np.arange(1, cfg.items + 1, dtype=np.float64) ** -cfg.zipf
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random((cfg.users, cfg.history)), side="right").clip(max=cfg.items - 1)
    return rng.permutation(cfg.items)[ranks] + 1


def build_own_package(workdir: str, cfg: OwnPackageConfig) -> OwnPackage:
    """Write ``workdir/model.pt`` and its store ``workdir/model.pt.histories`` (see the module docstring)."""
    import time

    cfg.validate()
    start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    vocab_sizes = {"user": cfg.users, "item": cfg.items, **_SMALL_SPACES}
    model_cfg = ModelConfig.preset(cfg.model)
    torch.manual_seed(cfg.seed)
    tensors = {f"weights.{k}": v for k, v in model_state(build_model(model_cfg, vocab_sizes, device="cpu")).items()}
    for space, size in vocab_sizes.items():
        tensors.update(_vocab_blobs(space, raw_ids(rng, size)))
    cluster = rng.integers(0, cfg.clusters, size=cfg.items + 1)
    tensors["mm_table"] = content_table(rng, cfg, cluster)
    cluster_category = rng.integers(1, vocab_sizes["category"] + 1, size=cfg.clusters)
    category = cluster_category[cluster]
    category[0] = 0
    for name, values in (("category", category), ("city", rng.integers(1, vocab_sizes["item_city"] + 1, cfg.items + 1)),
                         ("province", rng.integers(1, vocab_sizes["item_province"] + 1, cfg.items + 1))):
        values = values.astype(np.int64)
        values[0] = 0
        tensors[f"items.{name}"] = torch.from_numpy(values)
    fingerprint = f"bench-serve-{cfg.items}-{cfg.users}-{cfg.history}-{cfg.seed}"
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__}, "entry": f"{ENTRY_MODULE}.load", "model": model_cfg.to_dict(),
        "train_config": {"max_seq_len": None}, "vocab_sizes": vocab_sizes, "vocab_fingerprint": fingerprint,
        "dataset": {"path": os.path.abspath(workdir), "max_seq_len": None, "recent_len": model_cfg.recent_len,
                    "mm_dim": cfg.dim, "mm_dtype": "int8", "sources": ["muse bench serve: synthesized, untrained"]},
        "run": {"dir": os.path.abspath(workdir), "step": 0, "checkpoint": None, "checkpoint_meta": {}},
        "metrics": {"eval": [], "last_train": None, "records": 0},
        "blobs": {},
    }
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "model.pt")
    write_package(path, manifest, tensors)
    items = histories(rng, cfg)
    with atomic_output_dir(histories_path(path), force=True, flag="--workdir") as tmp:
        writer = HistoryWriter(tmp, cfg.users, cfg.items, vocab_sizes["category"], fingerprint, "bench")
        writer.add(np.arange(1, cfg.users + 1, dtype=np.int64), np.full(cfg.users, cfg.history, dtype=np.int64),
                   items.reshape(-1), category[items].reshape(-1),
                   rng.integers(1, 17, size=(cfg.users, len(PROFILE_FIELDS))))
        writer.close()
    distinct = [int(np.unique(row).shape[0]) for row in items]
    return OwnPackage(os.path.abspath(path), cfg.items + 1, distinct, time.perf_counter() - start)
