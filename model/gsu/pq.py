"""Product quantization of the frozen multimodal table (SEMINAR's approximate GSU): codebooks, codes, the index.

A table row r [D] is split into M subspaces of D / M values; each subspace has C <= 255 centroids (k-means on a
seeded sample of the table's non-zero rows) plus, last, the zero vector, and an item is stored as M uint8 codes,
the nearest centroid of each of its subspaces. The GSU ranks by cosine, so the codes quantize the unit row r / |r| (the row's norm is exact
and stored apart, ``RowNorms``): the cosine of a target t with an item is then about
``sum_m <t_m / |t|, centroid[m, code_m]>``, a sum of M entries of the target's lookup table
(``model.gsu.pq_topk``). An all-zero row (padding, items without content) is coded as the zero centroid in every
subspace (``ZERO_CODE``), so its estimate is exactly 0, as its cosine is, and the scan needs no norm lookup.

``train_codebooks`` and ``encode`` are plain torch (matrix products, deterministic for a seed on one host);
``PQIndex`` holds codes [N, M] uint8 and codebooks [M, C, D / M] float32, opened memory-mapped from the
directory ``muse pq`` writes beside ``mm_table.npy`` (``pq_dir``), and pickles by path (DataLoader workers
share the pages). Bytes: N x M for the codes (16 per item at M = 16, against 128 for the int8 table).
"""

import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from common.errors import DataError, UserError
from common.io import path_manager

PQ_FORMAT = 1
MAX_CENTROIDS = 255  # trained centroids per subspace; with the zero centroid, 256 codes: one uint8
ZERO_CODE = MAX_CENTROIDS  # the zero centroid's code when C = 255 (always the last centroid)
CODES_FILE, CODEBOOKS_FILE, META_FILE = "codes.npy", "codebooks.npy", "pq.json"
_DIST_ROWS = 1024  # rows per distance block ([M, rows, C] float32: 16 MB at M = 16, C = 256, about an L3)
_ENCODE_ROWS = _DIST_ROWS


@dataclass(frozen=True)
class PQSettings:
    """How codebooks are trained. m: subspaces (must divide D); centroids: trained per subspace (<= 255; the zero
    centroid is added last);
    sample_rows: non-zero table rows k-means sees (a seeded sample; all rows when fewer); iterations: Lloyd steps;
    seed: of the sample and the initial centroids."""

    m: int = 16
    centroids: int = MAX_CENTROIDS
    sample_rows: int = 65536
    iterations: int = 20
    seed: int = 0

    def check(self, dim: int) -> None:
        """UserError naming the flag for settings that cannot quantize a table of width ``dim``."""
        for flag, value in (("--m", self.m), ("--centroids", self.centroids), ("--sample-rows", self.sample_rows),
                            ("--iterations", self.iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{flag} {value!r}: must be a positive int")
        if dim % self.m:
            raise UserError(f"--m {self.m}: must divide the table width D = {dim}")
        if self.centroids > MAX_CENTROIDS:
            raise UserError(f"--centroids {self.centroids}: at most {MAX_CENTROIDS} (one uint8 per code, with the zero centroid)")


def unit_rows(rows: torch.Tensor, sq_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 [n, D]: rows / |row| (any table dtype; a zero row stays zero). sq_norm: optional float [n]."""
    x = rows.to(torch.float32)
    sq = (x * x).sum(1) if sq_norm is None else sq_norm.to(torch.float32)
    return x * torch.where(sq > 0, sq.clamp_min(1e-30).rsqrt(), torch.zeros((), dtype=torch.float32))[:, None]


def _split(x: torch.Tensor, m: int) -> torch.Tensor:
    """[n, D] -> [M, n, D / M] (subspace-major)."""
    return x.view(x.shape[0], m, -1).transpose(0, 1)


def _nearest(sub: torch.Tensor, codebooks: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """int64 [M, n]: per subspace the nearest centroid of each row. sub [M, n, d]; codebooks [M, C, d]; c_sq [M, C]."""
    dist = torch.baddbmm(c_sq[:, None, :], sub, codebooks.transpose(1, 2), alpha=-2)  # |x|^2: the same for every centroid
    return dist.argmin(2)


def train_codebooks(table: torch.Tensor, settings: PQSettings) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """(codebooks float32 [M, C + 1, D / M], stats) from ``table`` [N, D] (int8, bf16 or float32; row 0 padding):
    C = ``settings.centroids`` trained centroids, then the zero centroid.

    Seeded: the sample (``settings.sample_rows`` non-zero rows, drawn without replacement) and the initial
    centroids (C sample rows, with replacement when the sample is smaller) come from one ``torch.Generator``;
    Lloyd's iterations then run on unit rows; a centroid that loses all its rows keeps its place. stats: rows
    sampled, mean squared quantization error of the sample's unit rows at the end.
    """
    n, dim = table.shape
    settings.check(dim)
    generator = torch.Generator().manual_seed(settings.seed)
    sq = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, 1 << 16):
        rows = table[start:start + (1 << 16)].to(torch.float32)
        sq[start:start + rows.shape[0]] = (rows * rows).sum(1)
    live = (sq > 0).nonzero().squeeze(1)
    if live.numel() == 0:
        raise DataError("mm_table.npy: (file): every row is zero; nothing to quantize")
    pick = live[torch.randperm(live.numel(), generator=generator)[: settings.sample_rows]]
    pick = torch.sort(pick).values
    sub = _split(unit_rows(table.index_select(0, pick)), settings.m).contiguous()  # [M, S, d]
    m, count, width = sub.shape
    c = settings.centroids
    first = (torch.randperm(count, generator=generator)[:c] if count >= c
             else torch.randint(0, count, (c,), generator=generator))
    codebooks = sub[:, first].clone()  # [M, C, d]
    offsets = (torch.arange(m) * c)[:, None]
    for _ in range(settings.iterations):
        assign = _assign(sub, codebooks)
        flat = (assign + offsets).reshape(-1)
        sums = torch.zeros(m * c, width, dtype=torch.float32).index_add_(0, flat, sub.reshape(-1, width))
        counts = torch.bincount(flat, minlength=m * c).to(torch.float32)
        moved = sums / counts.clamp_min(1)[:, None]
        keep = (counts == 0)[:, None]
        codebooks = torch.where(keep, codebooks.reshape(-1, width), moved).view(m, c, width)
    assign = _assign(sub, codebooks)
    recon = codebooks.gather(1, assign[:, :, None].expand(-1, -1, width))
    error = float(((recon - sub) ** 2).sum(2).sum(0).mean())
    codebooks = torch.cat([codebooks, torch.zeros(m, 1, width)], 1).contiguous()
    return codebooks, {"sample_rows": int(count), "sample_sq_error": error}


def _assign(sub: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """int64 [M, S]: nearest centroids of every sample row, in blocks of _DIST_ROWS rows."""
    c_sq = (codebooks * codebooks).sum(2)
    return torch.cat([_nearest(sub[:, s:s + _DIST_ROWS], codebooks, c_sq) for s in range(0, sub.shape[1], _DIST_ROWS)], 1)


def encode(table: torch.Tensor, codebooks: torch.Tensor, chunk_rows: int = _ENCODE_ROWS) -> torch.Tensor:
    """uint8 [N, M]: every row's nearest centroid per subspace (of its unit row), ``chunk_rows`` rows at a time;
    a zero row gets the zero centroid (the last) in every subspace."""
    m, c, width = codebooks.shape
    if table.shape[1] != m * width:
        raise ValueError(f"codebooks: {m} x {width} values per row for a table of width {table.shape[1]}")
    _check_zero_centroid(codebooks)
    c_sq = (codebooks * codebooks).sum(2)
    out = torch.empty(table.shape[0], m, dtype=torch.uint8)
    for start in range(0, table.shape[0], chunk_rows):
        rows = table[start:start + chunk_rows].to(torch.float32)
        sq = (rows * rows).sum(1)
        codes = _nearest(_split(unit_rows(rows, sq), m), codebooks, c_sq).t()
        out[start:start + rows.shape[0]] = torch.where(sq[:, None] > 0, codes, c - 1).to(torch.uint8)
    return out


def _check_zero_centroid(codebooks: torch.Tensor) -> None:
    if codebooks.shape[1] < 2 or bool(codebooks[:, -1].any()):
        raise ValueError("codebooks: the last centroid of every subspace must be the zero vector (zero rows' code)")


def pq_dir(dataset_root: str, m: int) -> str:
    """Where ``muse pq`` writes the codes of ``m`` subspaces: ``<dataset>/pq-m<M>``, beside mm_table.npy."""
    return os.path.join(dataset_root, f"pq-m{m}")


class PQIndex:
    """Codes and codebooks of one table.

    codes: uint8 [N, M], row i the codes of table row i; codebooks: float32 [M, C, D / M] centroids of unit rows.
    meta: what ``muse pq`` recorded (settings, source table shape and sha256), {} for an index built in memory.
    source: the directory it was opened from (pickled by path), or None.
    """

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor, meta: Optional[Dict[str, Any]] = None,
                 source: Optional[str] = None):
        if codes.dim() != 2 or codes.dtype != torch.uint8:
            raise ValueError(f"codes: expected uint8 [N, M], got {codes.dtype} {tuple(codes.shape)}")
        if codebooks.dim() != 3 or codebooks.dtype != torch.float32 or codebooks.shape[0] != codes.shape[1]:
            raise ValueError(f"codebooks: expected float32 [M={codes.shape[1]}, C, d], got {codebooks.dtype} {tuple(codebooks.shape)}")
        if codebooks.shape[1] > MAX_CENTROIDS + 1:
            raise ValueError(f"codebooks: {codebooks.shape[1]} centroids, at most {MAX_CENTROIDS + 1}")
        _check_zero_centroid(codebooks)
        self.codes, self.codebooks = codes, codebooks
        self.meta = dict(meta or {})
        self.source = source

    @classmethod
    def build(cls, table: torch.Tensor, settings: PQSettings = PQSettings()) -> "PQIndex":
        """Train codebooks on ``table`` [N, D] and encode every row (in memory, nothing written)."""
        codebooks, stats = train_codebooks(table, settings)
        return cls(encode(table, codebooks), codebooks, {"settings": asdict(settings), **stats})

    @classmethod
    def open(cls, directory: str, expected_rows: Optional[int] = None, expected_dim: Optional[int] = None) -> "PQIndex":
        """The index ``muse pq`` wrote in ``directory`` (codes memory-mapped); DataError naming the file when it is
        damaged or belongs to another table shape."""
        local = path_manager.get_local_path(directory)
        meta_path = os.path.join(local, META_FILE)
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as err:
            raise DataError(f"{meta_path}: (file): not a readable PQ metadata file: {err}") from None
        if meta.get("format") != PQ_FORMAT:
            raise DataError(f"{meta_path}: format: {meta.get('format')!r}, expected {PQ_FORMAT}")
        codes = _load_npy(os.path.join(local, CODES_FILE), np.uint8, 2)
        codebooks = _load_npy(os.path.join(local, CODEBOOKS_FILE), np.float32, 3)
        if expected_rows is not None and codes.shape[0] != expected_rows:
            raise DataError(f"{os.path.join(local, CODES_FILE)}: (file): {codes.shape[0]} rows, but the table has "
                            f"{expected_rows} (stale codes: run muse pq again)")
        if codebooks.shape[0] != codes.shape[1] or (expected_dim is not None and codebooks.shape[0] * codebooks.shape[2] != expected_dim):
            raise DataError(f"{os.path.join(local, CODEBOOKS_FILE)}: (file): shape {tuple(codebooks.shape)} does not fit "
                            f"codes of {codes.shape[1]} subspaces and a table of width {expected_dim}")
        return cls(_tensor(codes), torch.from_numpy(np.array(codebooks)), meta, source=directory)

    @classmethod
    def beside(cls, table_path: str, m: int, rows: int, dim: int) -> "PQIndex":
        """The codes of ``m`` subspaces beside a prepared dataset's mm_table.npy (``table_path``);
        UserError saying how to make them when there are none."""
        directory = pq_dir(os.path.dirname(table_path), m)
        if not path_manager.exists(os.path.join(directory, META_FILE)):
            raise UserError(f"{directory}: no PQ codes for M = {m} (the model's pq_m); write them with "
                            f"`muse pq --data {os.path.dirname(table_path)} --m {m}`")
        index = cls.open(directory, rows, dim)
        dataset_meta = os.path.join(os.path.dirname(table_path), "metadata.json")  # table_path is local (MMTable.source)
        if os.path.exists(dataset_meta):
            with open(dataset_meta) as f:
                table_sha = json.load(f).get("mm_table_sha256")
            if table_sha and index.meta.get("table_sha256") not in (None, table_sha):
                raise DataError(f"{os.path.join(directory, META_FILE)}: table_sha256: codes of another mm_table.npy "
                                f"(stale: run `muse pq --data {os.path.dirname(table_path)} --m {m} --force`)")
        return index

    @property
    def m(self) -> int:
        return int(self.codes.shape[1])

    @property
    def num_rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def dim(self) -> int:
        return int(self.codebooks.shape[0] * self.codebooks.shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes the search reads from: codes plus codebooks."""
        return self.codes.numel() + self.codebooks.numel() * 4

    def reconstruct(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [n, D]: the unit-row approximations of table rows ``ids`` [n]."""
        codes = self.codes.index_select(0, ids).to(torch.int64)  # [n, M]
        m, _, width = self.codebooks.shape
        parts = self.codebooks[torch.arange(m)[None, :], codes]  # [n, M, d]
        return parts.reshape(ids.shape[0], m * width)

    def __reduce__(self):
        if self.source is not None:
            return (_reopen, (self.source,))
        return (PQIndex, (self.codes, self.codebooks, self.meta, None))

    def __repr__(self) -> str:
        return (f"PQIndex({self.num_rows} x M={self.m}, {self.codebooks.shape[1]} centroids of "
                f"{self.codebooks.shape[2]}, source={self.source!r})")


def _reopen(source: str) -> PQIndex:
    return PQIndex.open(source)


def _load_npy(path: str, dtype: Any, dims: int) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: (file): not a readable .npy array: {err}") from None
    if array.ndim != dims or array.dtype != dtype:
        raise DataError(f"{path}: (file): shape {array.shape} {array.dtype}, expected {np.dtype(dtype)} with {dims} dimensions")
    return array


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing a read-only memory map (nothing writes to the codes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def code_table_bytes(rows: int, m: int, dim: int, centroids: int = MAX_CENTROIDS + 1) -> int:
    """Bytes of a PQ index: rows x M uint8 codes + M x C x (D / M) float32 centroids (C with the zero centroid)."""
    return rows * m + centroids * dim * 4
