"""The table in the release's format: ``scl_embedding_int8_p90.parquet`` with columns ``205`` (int64 item id) and
``205_c`` (list<int8> of 128), each row a unit vector quantized as trunc(clip(x, -1, 1) * 127), written in
row groups of ``CHUNK_ROWS`` rows (memory bounded by a chunk), in the content file's row order."""

from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common.io import path_manager
from datapipes import schema as S
from pretraining.content import ContentTable
from pretraining.moco import Projection

CHUNK_ROWS = 65536
Embedder = Callable[[np.ndarray], np.ndarray]   # standardized float32 [n, D] -> unit float32 [n, 128]


def quantize(unit: np.ndarray) -> np.ndarray:
    """int8 [n, 128]: trunc(clip(x, -1, 1) * 127) of unit vectors [n, 128]."""
    return np.trunc(np.clip(unit, -1.0, 1.0) * 127).astype(np.int8)


def encoder_embedder(encoder: Projection) -> Embedder:
    """The trained query encoder as an Embedder."""
    encoder.eval()

    def embed(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return encoder(torch.from_numpy(x)).numpy()
    return embed


def projection_embedder(width: int, seed: int) -> Embedder:
    """The untrained baseline: x @ G, G [D, 128] i.i.d. N(0, 1/128) from (seed, 5), then unit norm (a zero
    projection stays zero). Gaussian projections preserve cosines approximately (Johnson-Lindenstrauss)."""
    g = np.random.default_rng([seed, 5]).standard_normal((width, S.MM_DIM)) / np.sqrt(S.MM_DIM)

    def embed(x: np.ndarray) -> np.ndarray:
        y = x.astype(np.float64) @ g
        return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    return embed


def table_chunks(content: ContentTable, embed: Embedder) -> Iterator[pa.Table]:
    for start in range(0, len(content), CHUNK_ROWS):
        rows = np.arange(start, min(len(content), start + CHUNK_ROWS))
        emb = quantize(embed(content.standardized(rows)))
        values = pa.ListArray.from_arrays(pa.array(np.arange(rows.size + 1, dtype=np.int32) * S.MM_DIM), pa.array(emb.reshape(-1)))
        yield pa.table({S.ITEM: content.ids[rows], S.EMBEDDING: values}, schema=S.arrow_schema(S.SCL_EMBEDDINGS))


def write_table(path: str, content: ContentTable, embed: Embedder) -> int:
    """Write every content row's quantized embedding to ``path``; returns the row count."""
    rows = 0
    with path_manager.open(path, "wb") as f:
        with pq.ParquetWriter(f, S.arrow_schema(S.SCL_EMBEDDINGS)) as writer:
            for table in table_chunks(content, embed):
                writer.write_table(table)
                rows += table.num_rows
    return rows
