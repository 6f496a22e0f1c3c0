"""``plan_capacity``: the whole offline capacity plan for one model, data scale and cluster."""

from dataclasses import dataclass
from typing import Mapping, Optional

from capacity.cluster import Cluster
from capacity.embedding import dense_parameter_bytes, plan_embeddings, unplaced_state_bytes
from capacity.extras import mm_bytes_per_host, mm_table_bytes, row_norm_bytes, sequence_memory
from capacity.layout import layout_rows, measured_layout
from capacity.report import REPORTED_SEQ_LENS, CapacityReport, assemble
from capacity.scale import DataScale
from model.config import ModelConfig
from model.gsu import DEFAULT_CHUNK_ROWS
from model.gsu.pq import code_table_bytes
from model.muse import build_model
from sharding.planner import Constraints


@dataclass(frozen=True)
class Workload:
    """What is trained: the model, its embedding optimizer, per-rank batch, history length, GSU inputs.

    gsu_chunk: history rows the GSU gathers per step (``model.gsu.DEFAULT_CHUNK_ROWS``; see ``capacity.extras``).
    """

    model: ModelConfig
    optimizer: str = "rowwise_adagrad"
    batch_size: int = 1000
    seq_len: int = 1000
    mm_dtype: str = "int8"
    mm_placement: str = "replicated-per-host"
    gsu_chunk: int = DEFAULT_CHUNK_ROWS


def plan_capacity(
    workload: Workload,
    scale: DataScale,
    cluster: Cluster,
    constraints: Optional[Constraints] = None,
    hbm_reserve: float = 0.15,
) -> CapacityReport:
    """Build the model on the meta device, plan its tables, add the multimodal table and the sequence memory."""
    model = build_model(workload.model, dict(scale.vocab_sizes), device="meta")
    embedding = plan_embeddings(model, cluster, workload.batch_size, workload.optimizer, constraints, hbm_reserve)
    item_rows = scale.rows("item")
    w = workload

    def memory(seq_len: int):
        return sequence_memory(w.batch_size, seq_len, scale.mm_dim, w.mm_dtype, w.gsu_chunk, w.model.id_dim, w.model.k,
                               w.model.recent_len, w.model.gsu)

    inputs: Mapping[str, object] = {
        "scale": scale.source,
        "vocab_sizes": dict(scale.vocab_sizes),
        "model": w.model.name,
        "gsu": w.model.gsu,
        "pq_m": w.model.pq_m,
        "id_dim": w.model.id_dim,
        "optimizer": w.optimizer,
        "batch_size": w.batch_size,
        "seq_len": w.seq_len,
        "mm_rows": item_rows,
        "mm_dim": scale.mm_dim,
        "mm_dtype": w.mm_dtype,
        "mm_placement": w.mm_placement,
        "gsu_chunk": w.gsu_chunk,
        "hbm_reserve": hbm_reserve,
    }
    seq_lens = sorted(set(REPORTED_SEQ_LENS) | {w.seq_len})
    layout = layout_rows(seq_lens, scale.vocab_sizes["user"], scale.samples, scale.vocab_sizes["category"], w.model.k,
                         w.model.recent_len)
    measured = measured_layout(scale.data_dir, scale.metadata) if scale.data_dir and scale.metadata else None
    return assemble(
        dict(inputs),
        cluster,
        embedding,
        unplaced_state_bytes(model, w.optimizer),
        dense_parameter_bytes(model),
        mm_table_bytes(item_rows, scale.mm_dim, w.mm_dtype),
        mm_bytes_per_host(item_rows, scale.mm_dim, w.mm_dtype, w.mm_placement, cluster.nnodes, cluster.nproc_per_node),
        [memory(n) for n in seq_lens],
        memory(w.seq_len),
        layout,
        measured,
        code_table_bytes(item_rows, w.model.pq_m, scale.mm_dim) if w.model.pq_m is not None else 0,
        row_norm_bytes(item_rows, w.mm_dtype),
    )
