"""Train PQ codebooks on a prepared dataset's frozen table and write every item's codes beside it, atomically.

Layout of ``<dataset>/pq-m<M>/`` (``model.gsu.pq.pq_dir``)::

    codes.npy       uint8 [V_item + 1, M]      row i: the codes of mm_table.npy row i (unit row, M subspaces)
    codebooks.npy   float32 [M, C, D / M]      the centroids
    pq.json         format, settings (m, centroids, sample_rows, iterations, seed), the source table's shape and
                    sha256 (as metadata.json records it), sample rows used, the sample's squared error, seconds

The directory is built under a temporary name and renamed when complete (``datapipes.tempdir``), so a reader
never sees half of it. Training and encoding use ``threads`` torch threads (matrix products).
"""

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch

from common.errors import UserError
from datapipes.prepared import PreparedDataset
from datapipes.tempdir import atomic_output_dir
from model.gsu.pq import CODEBOOKS_FILE, CODES_FILE, META_FILE, PQ_FORMAT, PQIndex, PQSettings, encode, pq_dir, train_codebooks


@dataclass(frozen=True)
class CodesSummary:
    path: str
    rows: int
    m: int
    code_bytes: int
    table_bytes: int
    train_s: float
    encode_s: float
    sample_sq_error: float


def write_codes(data: str, settings: PQSettings, force: bool = False, threads: Optional[int] = None) -> CodesSummary:
    """Codes of ``settings.m`` subspaces for the prepared dataset ``data``, written to ``pq_dir(data, m)``."""
    dataset = PreparedDataset.open(data)
    meta = dataset.metadata
    settings.check(meta.mm_dim)
    out = pq_dir(data, settings.m)
    if os.path.exists(out) and not force:
        raise UserError(f"--m {settings.m}: {out} already exists (pass --force to write it again)")
    with warnings.catch_warnings():  # a read-only memory map: nothing writes to the table
        warnings.simplefilter("ignore", UserWarning)
        table = torch.from_numpy(dataset.mm_table())
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        codebooks, stats = train_codebooks(table, settings)
        trained = time.perf_counter()
        codes = encode(table, codebooks)
        encoded = time.perf_counter()
    finally:
        torch.set_num_threads(saved)
    record: Dict[str, Any] = {
        "format": PQ_FORMAT, "settings": asdict(settings), "table_rows": int(table.shape[0]), "table_dim": int(table.shape[1]),
        "table_sha256": meta.mm_table_sha256, "quantizes": "unit rows r / |r| (cosine)", **stats,
        "train_seconds": round(trained - start, 3), "encode_seconds": round(encoded - trained, 3),
    }
    with atomic_output_dir(out, force=force, flag="--m") as tmp:
        np.save(os.path.join(tmp, CODES_FILE), codes.numpy())
        np.save(os.path.join(tmp, CODEBOOKS_FILE), codebooks.numpy())
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
    index = PQIndex.open(out, int(table.shape[0]), int(table.shape[1]))
    return CodesSummary(out, index.num_rows, index.m, index.nbytes, int(table.numel()), record["train_seconds"],
                        record["encode_seconds"], stats["sample_sq_error"])


def ensure_codes(data: str, m: int, threads: Optional[int] = None) -> Optional[CodesSummary]:
    """Write the codes of ``m`` subspaces with the default settings unless they exist (``muse compare --pq``)."""
    if os.path.exists(os.path.join(pq_dir(data, m), META_FILE)):
        return None
    return write_codes(data, PQSettings(m=m), threads=threads)
