"""The PQ part of ``muse bench gsu --pq M``: tables with structure, the index build, recall and bytes.

A random uniform table is the worst case for product quantization (no structure: every centroid is as good as
another, and the top-K's cosines barely stand out of the noise), so ``--table-kind clustered`` builds one the way
``muse synth`` builds content embeddings (unit cluster centroids plus 0.8 x N(0, I / D) noise, stored as
trunc(clip(x, -1, 1) x 127)), with histories drawn like synth users' (a few interest clusters, 10% from anywhere),
and ``--table-from DATA`` reads a prepared dataset's real ``mm_table.npy`` (e.g. from ``muse synth`` + ``muse prepare``),
its histories uniform over its items.

recall@K: per sample, the share of the exact top-K positions (``cosine_topk``) the approximate top-K also holds,
averaged over samples with at least one behavior. Bytes read per batch are counted from the shapes (what each
method's scan reads, not measured): exact: every distinct history position's row (the int8 shadow's with
``--int8-filter`` on bf16); PQ: M code bytes per distinct history position, each target's row, and with
re-scoring K' rows per sample.
"""

import os
import time
from typing import Optional, Tuple

import numpy as np
import torch

from common.errors import UserError
from model.gsu.pq import PQIndex, PQSettings
from model.gsu.table import INT8_SCALE, MMTable, RowNorms, row_norms

TABLE_KINDS = ("random", "clustered")
ROWS_PER_CLUSTER = 2000
_INTERESTS, _NOISE, _EMBEDDING_NOISE = 4, 0.1, 0.8


def clustered_table(name: str, rows: int, dim: int, clusters: int, generator: torch.Generator) -> Tuple[torch.Tensor, RowNorms]:
    """int8/bf16/float32 [rows, dim] as ``muse synth`` writes content: row i (i >= 1) belongs to cluster
    (i - 1) * clusters // (rows - 1); row 0 zeros. Converted as ``MMTable.load`` would."""
    dtype = {"int8": torch.int8, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    centroids = torch.randn(clusters, dim, generator=generator)
    centroids /= centroids.norm(dim=1, keepdim=True)
    table = torch.empty(rows, dim, dtype=dtype)
    table[0] = 0
    step = 1 << 18
    for start in range(1, rows, step):
        end = min(rows, start + step)
        cluster = (torch.arange(start, end) - 1) * clusters // (rows - 1)
        x = centroids[cluster] + _EMBEDDING_NOISE * torch.randn(end - start, dim, generator=generator) / dim ** 0.5
        q = torch.trunc(x.clamp(-1, 1) * INT8_SCALE).to(torch.int8)
        table[start:end] = q if dtype == torch.int8 else (q.float() / INT8_SCALE).to(dtype)
    return table, row_norms(table)


def clustered_batch(rows: int, clusters: int, batch: int, length: int, per_user: int,
                    generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets [B], history [B, L], distinct [U, L]) like synth users: each user has a few interest clusters, its
    behaviors uniform within them (10% from any item); its targets half from its interests, half from anywhere."""
    users = batch // per_user
    size = (rows - 1) / clusters

    def in_cluster(cluster: torch.Tensor) -> torch.Tensor:
        lo = 1 + torch.ceil(cluster * size).long()
        hi = 1 + torch.ceil((cluster + 1) * size).long()
        return (lo + (torch.rand(cluster.shape, generator=generator) * (hi - lo).clamp_min(1)).long()).clamp(1, rows - 1)

    interests = torch.randint(0, clusters, (users, _INTERESTS), generator=generator)
    pick = torch.randint(0, _INTERESTS, (users, length), generator=generator)
    hist = in_cluster(interests.gather(1, pick))
    anywhere = torch.rand(users, length, generator=generator) < _NOISE
    hist = torch.where(anywhere, torch.randint(1, rows, (users, length), generator=generator), hist).clamp(1, rows - 1)
    order = torch.randperm(batch, generator=generator) if per_user > 1 else torch.arange(batch)
    owner = torch.arange(users).repeat_interleave(per_user)[order]
    mine = interests[owner, torch.randint(0, _INTERESTS, (batch,), generator=generator)]
    targets = torch.where(torch.rand(batch, generator=generator) < 0.5, in_cluster(mine),
                          torch.randint(1, rows, (batch,), generator=generator)).clamp(1, rows - 1)
    return targets, hist[owner], hist


def table_from(data: str, name: str) -> Tuple[torch.Tensor, RowNorms]:
    """A prepared dataset's mm_table.npy (``data``: its directory), converted to ``name`` as ``MMTable.load`` does."""
    mm = MMTable.load(data, dtype=name, int8_filter=False)
    table = mm.table if name != "int8" else torch.from_numpy(np.array(mm.table.numpy()))
    return table, row_norms(table)


def build_index(table: torch.Tensor, m: int, sample_rows: int, seed: int) -> Tuple[PQIndex, float]:
    """(the table's PQ index, seconds), built with every CPU's torch thread (not timed as the GSU)."""
    if table.shape[1] % m:
        raise UserError(f"--pq {m}: must divide --dim {table.shape[1]}")
    saved = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        start = time.perf_counter()
        index = PQIndex.build(table, PQSettings(m=m, sample_rows=sample_rows, seed=seed))
        return index, time.perf_counter() - start
    finally:
        torch.set_num_threads(saved)


def recall_at_k(approx: Tuple[torch.Tensor, ...], exact: Tuple[torch.Tensor, ...]) -> Optional[float]:
    """Mean over samples with behaviors of |approx top-K positions & exact top-K positions| / |exact top-K|."""
    _, a_pos, a_valid = approx[:3]
    _, e_pos, e_valid = exact[:3]
    a = torch.where(a_valid, a_pos, torch.full((), -1))
    e = torch.where(e_valid, e_pos, torch.full((), -2))
    hits = (e[:, :, None] == a[:, None, :]).any(2).sum(1).float()
    counts = e_valid.sum(1).float()
    real = counts > 0
    return float((hits[real] / counts[real]).mean()) if bool(real.any()) else None


def exact_bytes_read(distinct_positions: int, table: torch.Tensor, shadow: bool) -> int:
    """Bytes the exact scan reads: one row (its int8 shadow row with ``shadow``) per distinct history position."""
    return distinct_positions * table.shape[1] * (1 if shadow else table.element_size())


def pq_bytes_read(distinct_positions: int, index: PQIndex, table: torch.Tensor, batch: int, candidates: int) -> int:
    """Bytes the PQ scan reads: M codes per distinct history position, each target's row, K' re-scored rows per sample."""
    row = table.shape[1] * table.element_size()
    return distinct_positions * index.m + batch * row + batch * candidates * row


def exact_table_bytes(table: torch.Tensor, shadow: bool) -> int:
    return table.numel() * table.element_size() + (table.numel() if shadow else 0)
