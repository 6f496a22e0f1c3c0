"""The stored retrieval: what the ESU reads of every sample of a prepared dataset, computed once by ``muse retrieve``.

Layout of a retrieval directory (default ``<dataset>/retrieval/<gsu>-k<K>-l<L>``)::

    retrieval.json                 format, spec (gsu, k, recent_len, max_seq_len, pq), model, vocab_fingerprint,
                                   mm_table_sha256, splits {split: {rows, parts: [{path, begin, end}]}}
    <split>/part-RRRRR/            the samples [begin, end) of the split (one part per retrieving rank)
        gsu_items.npy    int32 [n, K]    item indices of the GSU's selection, in its order; 0 past the count
        gsu_cats.npy     int32 [n, K]    their category indices
        gsu_lengths.npy  int32 [n]       selected behaviors per sample
        gsu_scores.npy   float32 [n, K]  their cosines R with the target; 0 past the count
        recent_scores.npy float32 [n, S] cosines of the recent S behaviors with the target

The recent behaviors themselves are the newest entries of the history store, read at batch time. A retrieval
belongs to one dataset (its vocabulary fingerprint and multimodal table checksum) and one ``RetrievalSpec``;
the trainer uses it only when both match, and refuses one that claims to match but is damaged.
"""

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from common.errors import DataError, UserError
from common.io import path_manager
from datapipes.prepared import PreparedDataset
from model.config import PIPELINE_GSU

RETRIEVAL_FORMAT = 1
RETRIEVAL_META = "retrieval.json"
RETRIEVAL_DIR = "retrieval"
ARRAYS = ("gsu_items", "gsu_cats", "gsu_lengths", "gsu_scores", "recent_scores")


@dataclass(frozen=True)
class RetrievalSpec:
    """What determines a retrieval's content besides the data: the pipeline GSU, its K, the recent window S and the
    history length L it searched (the dataset's longest history when the run sets none)."""

    gsu: str
    k: int
    recent_len: int
    max_seq_len: int
    pq: str = ""  # the approximate multimodal GSU: "pq<M>c<K'>" (``ModelConfig.pq_m``, ``pq_candidates``); "" exact

    @classmethod
    def of(cls, model, max_seq_len: Optional[int], dataset: PreparedDataset) -> "RetrievalSpec":
        """The spec a model config (``ModelConfig``) and a run's ``max_seq_len`` would retrieve on ``dataset``."""
        longest = dataset.metadata.max_seq_len
        pq_m = getattr(model, "pq_m", None) if model.gsu == "multimodal" else None
        pq = f"pq{pq_m}c{getattr(model, 'pq_candidates', 0)}" if pq_m is not None else ""
        return cls(model.gsu, model.k, model.recent_len, min(max_seq_len, longest) if max_seq_len else longest, pq)

    @property
    def name(self) -> str:
        pq = f"-{self.pq}" if self.pq else ""
        return f"{self.gsu}{pq}-k{self.k}-s{self.recent_len}-l{self.max_seq_len}"

    def widths(self) -> Dict[str, Tuple[np.dtype, Tuple[int, ...]]]:
        """Each array's dtype and per-sample shape."""
        return {"gsu_items": (np.dtype(np.int32), (self.k,)), "gsu_cats": (np.dtype(np.int32), (self.k,)),
                "gsu_lengths": (np.dtype(np.int32), ()), "gsu_scores": (np.dtype(np.float32), (self.k,)),
                "recent_scores": (np.dtype(np.float32), (self.recent_len,))}


def default_location(dataset_root: str, spec: RetrievalSpec) -> str:
    return os.path.join(dataset_root, RETRIEVAL_DIR, spec.name)


@dataclass(frozen=True)
class Part:
    """One part of a split: samples [begin, end) in ``path`` (relative to the retrieval directory)."""

    path: str
    begin: int
    end: int


class PartWriter:
    """Writes one part (a contiguous range of one split's samples) under ``directory``. Batches may arrive in any
    order (several data workers interleave theirs); every sample of the range must be written exactly once."""

    def __init__(self, directory: str, spec: RetrievalSpec, begin: int, end: int):
        os.makedirs(directory, exist_ok=True)
        self.begin, self.end = begin, end
        self.written = np.zeros(end - begin, dtype=bool)
        self.arrays = {name: np.lib.format.open_memmap(os.path.join(directory, f"{name}.npy"), mode="w+", dtype=dtype,
                                                       shape=(end - begin,) + shape)
                       for name, (dtype, shape) in spec.widths().items()}

    def write(self, sample_index: np.ndarray, values: Dict[str, np.ndarray]) -> None:
        """Samples ``sample_index`` (int64 [n], rows of the split inside the range, none written before) and their
        values per array ([n, ...])."""
        if sample_index.size == 0:
            return
        local = sample_index.astype(np.int64) - self.begin
        if local.min() < 0 or local.max() >= self.written.size:
            raise RuntimeError(f"samples {int(sample_index.min())}..{int(sample_index.max())}: outside the part's "
                               f"range [{self.begin}, {self.end})")
        if self.written[local].any() or np.unique(local).size != local.size:
            raise RuntimeError(f"samples {int(sample_index.min())}..{int(sample_index.max())}: some written twice")
        for name, arr in self.arrays.items():
            arr[local] = values[name]
        self.written[local] = True

    def close(self) -> None:
        done = int(self.written.sum())
        if done != self.written.size:
            raise RuntimeError(f"part [{self.begin}, {self.end}): only {done} samples written")
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()


def write_meta(directory: str, spec: RetrievalSpec, model: str, dataset: PreparedDataset,
               splits: Dict[str, List[Part]]) -> dict:
    meta = {"format": RETRIEVAL_FORMAT, "spec": asdict(spec), "model": model,
            "vocab_fingerprint": dataset.metadata.vocab_fingerprint,
            "mm_table_sha256": dataset.metadata.mm_table_sha256,
            "splits": {split: {"rows": sum(p.end - p.begin for p in parts), "parts": [asdict(p) for p in parts]}
                       for split, parts in splits.items()}}
    with open(os.path.join(directory, RETRIEVAL_META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


class StoredRetrieval:
    """One split of a retrieval, memory-mapped; ``rows(sample_index)`` gathers the arrays of any samples."""

    def __init__(self, root: str, spec: RetrievalSpec, split: str, parts: List[Part], arrays: List[Dict[str, np.ndarray]]):
        self.root, self.spec, self.split, self.parts, self._arrays = root, spec, split, parts, arrays
        self._begins = np.array([p.begin for p in parts], dtype=np.int64)

    def __reduce__(self):
        return (_reopen, (self.root, self.split))

    def rows(self, sample_index: np.ndarray) -> Dict[str, np.ndarray]:
        """{array name: [n, ...]} of the samples ``sample_index`` (int64 [n], rows of the split)."""
        part = np.searchsorted(self._begins, sample_index, side="right") - 1
        out = {name: np.empty((sample_index.size,) + shape, dtype) for name, (dtype, shape) in self.spec.widths().items()}
        for p in np.unique(part).tolist():
            sel = np.flatnonzero(part == p)
            local = sample_index[sel] - self.parts[p].begin
            for name, arr in self._arrays[p].items():
                out[name][sel] = arr[local]
        return out


def _reopen(root: str, split: str) -> StoredRetrieval:
    return open_split(root, split)


def read_meta(root: str) -> dict:
    path = os.path.join(root, RETRIEVAL_META)
    try:
        with path_manager.open(path, "r") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: (file): not a retrieval (no {RETRIEVAL_META}; run `muse retrieve`)") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: (file): unreadable retrieval description: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != RETRIEVAL_FORMAT:
        raise DataError(f"{path}: format: not retrieval format {RETRIEVAL_FORMAT}")
    try:
        RetrievalSpec(**meta["spec"])
        for info in meta["splits"].values():
            [Part(**p) for p in info["parts"]]
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: (file): malformed retrieval description: {err}") from None
    return meta


def open_split(root: str, split: str) -> StoredRetrieval:
    """The split ``split`` of the retrieval at ``root``, every part's arrays checked (missing, truncated, wrong
    shape or dtype: DataError naming the file)."""
    meta = read_meta(root)
    spec = RetrievalSpec(**meta["spec"])
    if split not in meta["splits"]:
        raise DataError(f"{os.path.join(root, RETRIEVAL_META)}: splits: no split {split!r} (has {', '.join(meta['splits'])})")
    parts = [Part(**p) for p in meta["splits"][split]["parts"]]
    expected_begin = 0
    arrays = []
    for part in parts:
        if part.begin != expected_begin or part.end < part.begin:
            raise DataError(f"{os.path.join(root, RETRIEVAL_META)}: splits.{split}.parts: ranges are not contiguous at {part.path}")
        expected_begin = part.end
        loaded = {}
        for name, (dtype, shape) in spec.widths().items():
            path = os.path.join(root, part.path, f"{name}.npy")
            try:
                arr = np.load(path_manager.get_local_path(path), mmap_mode="r")
            except FileNotFoundError:
                raise DataError(f"{path}: (file): missing from the retrieval") from None
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: (file): unreadable or truncated: {' '.join(str(err).split())}") from None
            if arr.dtype != dtype or arr.shape != (part.end - part.begin,) + shape:
                raise DataError(f"{path}: (file): {arr.dtype} {arr.shape}, expected {dtype} {(part.end - part.begin,) + shape}")
            loaded[name] = arr
        arrays.append(loaded)
    return StoredRetrieval(root, spec, split, parts, arrays)


def check_matches(root: str, meta: dict, dataset: PreparedDataset, spec: Optional[RetrievalSpec], splits: List[str]) -> None:
    """DataError naming ``root``'s description when the retrieval was made on another dataset (vocabulary,
    multimodal table, row counts), for another spec (when ``spec`` is given), or lacks one of ``splits``."""
    path = os.path.join(root, RETRIEVAL_META)
    if meta["vocab_fingerprint"] != dataset.metadata.vocab_fingerprint:
        raise DataError(f"{path}: vocab_fingerprint: made on a dataset of another vocabulary than {dataset.root}")
    if meta["mm_table_sha256"] != dataset.metadata.mm_table_sha256:
        raise DataError(f"{path}: mm_table_sha256: made with another multimodal table than {dataset.root}'s")
    stored = RetrievalSpec(**meta["spec"])
    if spec is not None and stored != spec:
        diff = ", ".join(f"{k} {getattr(stored, k)} (run: {getattr(spec, k)})" for k in asdict(spec) if getattr(stored, k) != getattr(spec, k))
        raise DataError(f"{path}: spec: retrieved with {diff}")
    for split in splits:
        if split not in meta["splits"]:
            raise DataError(f"{path}: splits: no split {split!r}")
        rows = meta["splits"][split]["rows"]
        if rows != dataset.split(split).rows:
            raise DataError(f"{path}: splits.{split}.rows: {rows}, but {dataset.root} has {dataset.split(split).rows} rows")


def find_retrieval(dataset: PreparedDataset, spec: RetrievalSpec, choice: str, splits: List[str]) -> Optional[str]:
    """The retrieval directory a run uses, or None for the online GSU.

    choice: "none" (never), "auto" (the one under ``<dataset>/retrieval/`` whose spec equals ``spec``, if any),
    or a path (must match: DataError otherwise). Models whose GSU runs in the model (SIM-soft, TWIN) or that
    read no lifelong behavior (DIN) never use one. A found retrieval is checked (``check_matches``, every array).
    """
    if choice == "none" or spec.gsu not in PIPELINE_GSU:
        if choice not in ("none", "auto"):
            raise UserError(f"--retrieval {choice}: gsu {spec.gsu!r} has no stored retrieval (only {', '.join(PIPELINE_GSU)})")
        return None
    if choice == "auto":
        root = default_location(dataset.root, spec)
        if not path_manager.exists(os.path.join(root, RETRIEVAL_META)):
            return None
    else:
        root = choice
    meta = read_meta(root)
    check_matches(root, meta, dataset, spec, splits)
    for split in splits:
        open_split(root, split)
    return root
