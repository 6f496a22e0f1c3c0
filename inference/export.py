"""``export_package``: a training run -> one self-contained torch.package for serving.

The package holds
- code: this project's ``model`` package, ``datapipes.batch``, ``inference.predictor`` and
  ``inference.manifest`` (interned, so the serving process needs no copy of this project); torch,
  torchrec, fbgemm_gpu and numpy stay extern (imported from the serving environment); ``common.io``
  (iopath file access, imported by ``model.gsu.table`` but never used by a table built from a tensor) is
  mocked, so iopath is not needed at serving;
- blobs (raw tensors, each with dtype, shape, size and sha256 in the manifest): ``weights.<name>`` of the
  unsharded model, ``mm_table`` (the frozen multimodal table, int8), ``vocab.<space>.keys/index`` (raw
  hashed id -> index), ``items.category/city/province`` (attributes per item index, from the dataset's
  ``item_attributes.parquet``); for a model on the approximate GSU (``pq_m``) also ``pq.codes`` (uint8 [N, M])
  and ``pq.codebooks`` (float32 [M, C, D / M]) from ``<dataset>/pq-m<M>`` (``muse pq``), attached to the
  predictor's GSU stage by ``inference.loader``;
- ``muse/manifest.json``: format version, library versions, the model and training config, vocabulary
  sizes, the run, checkpoint and dataset it came from, and the run's training metrics.
The file is written under a temporary name and renamed when complete.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np
import torch
from torch.package import PackageExporter

from common.atomic import atomic_file
from common.io import path_manager
from datapipes.prepared import PreparedDataset
from datapipes.tempdir import atomic_output_dir
from inference.checkpoint import TrainedModel, load_trained_model, model_state
from inference.manifest import BLOB_PACKAGE, ENTRY_MODULE, FORMAT_VERSION, MANIFEST_NAME, MANIFEST_PACKAGE, tensor_to_blob
from inference.predictor import ID_SPACES
from model.gsu.pq import PQIndex

INTERN = ["model", "model.**", "datapipes", "datapipes.batch", "datapipes.histories", "inference", "inference.predictor", "inference.manifest",
          "inference.loader", "common", "common.errors"]
EXTERN = ["torch", "torch.**", "torchrec", "torchrec.**", "fbgemm_gpu", "fbgemm_gpu.**", "numpy", "numpy.**"]
MOCK = ["common.io"]
_DISTRIBUTIONS = ("torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "numpy", "muse-torchrec")


@dataclass(frozen=True)
class ExportSummary:
    path: str
    bytes: int
    step: int
    blobs: int
    items_with_attributes: int


def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in _DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _vocab_tensors(dataset: PreparedDataset) -> Dict[str, torch.Tensor]:
    """Per id space: raw ids sorted ascending (``keys``) and their vocabulary indices (``index``)."""
    out = {}
    for space in ID_SPACES:
        ids = np.asarray(dataset.vocab(space).ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        out[f"vocab.{space}.keys"] = torch.from_numpy(ids[order].copy())
        out[f"vocab.{space}.index"] = torch.from_numpy(order.astype(np.int64) + 1)
    return out


def _metrics_summary(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Every evaluation record and the last training record of ``metrics.jsonl``."""
    train = [r for r in records if r.get("kind") == "train"]
    return {"eval": [r for r in records if r.get("kind") == "eval"], "last_train": train[-1] if train else None,
            "records": len(records)}


def collect_tensors(trained: TrainedModel) -> tuple[Dict[str, torch.Tensor], int]:
    """(every blob of the package as a tensor, number of items with at least one known attribute)."""
    dataset = trained.dataset
    tensors = {f"weights.{k}": v for k, v in model_state(trained.model).items()}
    tensors["mm_table"] = torch.from_numpy(np.array(dataset.mm_table()))  # one read of the memory map
    tensors.update(_vocab_tensors(dataset))
    attrs = {k: np.array(v, dtype=np.int64) for k, v in dataset.item_attributes().items()}  # writable copies
    tensors["items.category"] = torch.from_numpy(attrs["category"])
    tensors["items.city"] = torch.from_numpy(attrs["item_city"])
    tensors["items.province"] = torch.from_numpy(attrs["item_province"])
    known = (attrs["category"] != 0) | (attrs["item_city"] != 0) | (attrs["item_province"] != 0)
    index = pq_index(trained)
    if index is not None:
        tensors["pq.codes"] = torch.from_numpy(np.array(index.codes.numpy()))
        tensors["pq.codebooks"] = index.codebooks.clone()
    return tensors, int(known[1:].sum())


def pq_index(trained: TrainedModel) -> PQIndex | None:
    """The PQ codes the run's GSU reads (``ModelConfig.pq_m``), beside the dataset's table; None for the exact GSU."""
    model, meta = trained.config.model, trained.dataset.metadata
    if model.gsu != "multimodal" or model.pq_m is None:
        return None
    return PQIndex.beside(os.path.join(trained.dataset.root, "mm_table.npy"), model.pq_m,
                          meta.vocab_sizes["item"] + 1, meta.mm_dim)


def build_manifest(trained: TrainedModel, run_dir: str) -> Dict[str, Any]:
    meta = trained.dataset.metadata
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "entry": f"{ENTRY_MODULE}.load",
        "model": trained.config.model.to_dict(),
        "train_config": trained.config.to_dict(),
        "vocab_sizes": dict(meta.vocab_sizes),
        "vocab_fingerprint": meta.vocab_fingerprint,
        "dataset": {"path": os.path.abspath(trained.dataset.root), "max_seq_len": meta.max_seq_len,
                    "recent_len": meta.recent_len, "mm_dim": meta.mm_dim, "mm_dtype": meta.mm_dtype, "sources": meta.sources},
        "run": {"dir": os.path.abspath(run_dir), "step": trained.checkpoint.step, "checkpoint": trained.checkpoint.path,
                "checkpoint_meta": trained.checkpoint.meta},
        "metrics": _metrics_summary(trained.metrics),
        "pq": None if pq_index(trained) is None else pq_index(trained).meta,
        "blobs": {},
    }


def write_package(out: str, manifest: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> int:
    """Write the package atomically; fills ``manifest["blobs"]``; returns the file size in bytes."""
    with atomic_file(out, flag="--out") as tmp:
        with PackageExporter(tmp) as exporter:
            exporter.intern(INTERN)
            exporter.extern(EXTERN)
            exporter.mock(MOCK)
            exporter.save_module(ENTRY_MODULE)
            for name, tensor in tensors.items():
                data, entry = tensor_to_blob(tensor)
                exporter.save_binary(BLOB_PACKAGE, name, data)
                manifest["blobs"][name] = entry
            exporter.save_text(MANIFEST_PACKAGE, MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True))
        size = os.path.getsize(tmp)
    return size


def histories_path(package: str) -> str:
    """Where ``muse export --histories`` puts the history store beside a package: ``<package>.histories``."""
    return f"{package}.histories"


def copy_histories(dataset: PreparedDataset, split: str, out: str, force: bool = True) -> str:
    """Copy ``split``'s history store of ``dataset`` to ``out`` (a directory, written atomically)."""
    source = path_manager.get_local_path(os.path.join(dataset.root, dataset.split(split).histories))
    dataset.histories(split)  # refuse a damaged store before copying it
    with atomic_output_dir(out, force=force, flag="--histories") as tmp:
        for name in sorted(os.listdir(source)):
            shutil.copyfile(os.path.join(source, name), os.path.join(tmp, name))
    return out


def export_package(run_dir: str, out: str, data_dir: str | None = None, histories: str | None = None) -> ExportSummary:
    """Export the newest complete checkpoint of ``run_dir`` to the package file ``out``; with ``histories`` (a split
    name), also copy that split's history store beside it (``histories_path(out)``), so the package serves users
    by id."""
    trained = load_trained_model(run_dir, data_dir)
    if histories is not None:
        trained.dataset.split(histories)
    tensors, items_seen = collect_tensors(trained)
    manifest = build_manifest(trained, run_dir)
    size = write_package(out, manifest, tensors)
    if histories is not None:
        copy_histories(trained.dataset, histories, histories_path(out))
    return ExportSummary(os.path.abspath(out), size, trained.checkpoint.step, len(tensors), items_seen)
