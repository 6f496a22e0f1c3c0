"""Memory the embedding planner does not count: the frozen multimodal table and the long sequence.

All figures are plain products, so they can be checked by hand:

- multimodal table: ``item rows x mm_dim x bytes(mm dtype)``; ``replicated-per-host`` keeps one
  memory-mapped copy per host (shared by its ranks), ``sharded`` splits the rows evenly over all ranks.
- GSU row norms: ``item rows x 4`` (float32 squared norms of an int8 table; 8 for bf16/fp32), one copy per rank
  (each rank's process computes them when it loads the table; its data workers share them).
- per batch of the long sequence, per rank (B = per-rank batch, L = history length, D = mm_dim,
  b = bytes per table value, C = the GSU's chunk of gathered rows, K = top-k):
  ``raw history``   B x L x 2 x 8      int64 item and category ids of the reader's batch;
  ``gsu unchunked`` B x L x D x (b + 4) + B x L x 4
                    the gather-convert-normalize-matmul reference: every gathered row in the table's dtype,
                    its fp32 copy, and one fp32 score per behavior;
  ``gsu chunked``   C x D x b + C x 16 x 4 + B x K x 8
                    the project's ``cosine_topk``: one buffer of C gathered rows, their dot products with the
                    (at most 16) targets of a block, and the running top-K keys; independent of L.
  These live where the GSU runs: in the input pipeline, in host DDR.
- on the compute device (per rank, fp32, forward value + gradient): the ID embeddings the ESU reads,
  ``B x (1 + S + K) x 2 x d x 4 x 2`` (item and category ids of the target, the S recent and the K
  selected behaviors); for the in-model GSU variants (``id``: SIM-soft, ``attention``: TWIN) the whole
  history goes through the ID tables: ``B x (1 + S + K + L) x 2 x d x 4 x 2``.
"""

from dataclasses import dataclass

MM_DTYPE_BYTES = {"int8": 1, "bf16": 2, "fp32": 4}
MM_PLACEMENTS = ("replicated-per-host", "sharded")
IN_MODEL_GSU = ("id", "attention")
ID_BYTES = 8
FP32 = 4
GSU_BLOCK_TARGETS = 16  # targets scored together per gathered block in model.gsu.cosine_topk


def mm_table_bytes(item_rows: int, mm_dim: int, mm_dtype: str) -> int:
    """Bytes of the frozen multimodal table: item rows x mm_dim x bytes per value."""
    if mm_dtype not in MM_DTYPE_BYTES:
        raise ValueError(f"mm_dtype: unknown {mm_dtype!r} (choose from {', '.join(MM_DTYPE_BYTES)})")
    return item_rows * mm_dim * MM_DTYPE_BYTES[mm_dtype]


def mm_bytes_per_host(item_rows: int, mm_dim: int, mm_dtype: str, placement: str, nnodes: int, nproc_per_node: int) -> int:
    """Multimodal table bytes one host holds: the whole table (replicated) or its ranks' row shards (sharded)."""
    if placement not in MM_PLACEMENTS:
        raise ValueError(f"placement: unknown {placement!r} (choose from {', '.join(MM_PLACEMENTS)})")
    if placement == "replicated-per-host":
        return mm_table_bytes(item_rows, mm_dim, mm_dtype)
    world = nnodes * nproc_per_node
    rows_per_rank = -(-item_rows // world)
    return nproc_per_node * mm_table_bytes(rows_per_rank, mm_dim, mm_dtype)


def row_norm_bytes(item_rows: int, mm_dtype: str) -> int:
    """Bytes of the GSU's per-row squared norms (``model.gsu.table.RowNorms.sq_norm``): item rows x 4 (float32 for an
    int8 table, exact there) or x 8 (float64 for bf16/fp32 tables). Each process that loads the table (each rank)
    computes its own copy, shared with its data workers."""
    if mm_dtype not in MM_DTYPE_BYTES:
        raise ValueError(f"mm_dtype: unknown {mm_dtype!r} (choose from {', '.join(MM_DTYPE_BYTES)})")
    return item_rows * (FP32 if mm_dtype == "int8" else 2 * FP32)


@dataclass(frozen=True)
class SequenceMemory:
    """Per-rank bytes of one batch of the long sequence at history length ``seq_len``."""

    seq_len: int
    raw_history: int
    gsu_unchunked: int
    gsu_chunked: int
    device_activations: int


def sequence_memory(
    batch_size: int, seq_len: int, mm_dim: int, mm_dtype: str, chunk: int, id_dim: int, k: int, recent_len: int, gsu: str
) -> SequenceMemory:
    """The products in this module's docstring for one per-rank batch."""
    if chunk < 1:
        raise ValueError(f"chunk: must be >= 1 (got {chunk})")
    b = MM_DTYPE_BYTES[mm_dtype]
    per_row = mm_dim * (b + FP32)
    ids_read = 1 + recent_len + k + (seq_len if gsu in IN_MODEL_GSU else 0)
    return SequenceMemory(
        seq_len=seq_len,
        raw_history=batch_size * seq_len * 2 * ID_BYTES,
        gsu_unchunked=batch_size * seq_len * (per_row + FP32),
        gsu_chunked=chunk * (mm_dim * b + GSU_BLOCK_TARGETS * FP32) + batch_size * k * ID_BYTES,
        device_activations=batch_size * ids_read * 2 * id_dim * FP32 * 2,
    )
