"""The capacity plan: the planner's per-rank placement plus what it does not count, and the verdict.

Resources checked: HBM of every rank (``--compute-device cuda``) and DDR of every host. A resource's
use is the sum of its named parts (all in bytes, listed in the JSON); the plan fits when every
resource's use is at most its capacity and the planner found a placement. The binding constraint is
the resource with the highest use / capacity (or the planner's failure).
"""

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from tabulate import tabulate

from capacity.cluster import GIB, Cluster
from capacity.embedding import EmbeddingPlan
from capacity.extras import SequenceMemory
from capacity.layout import LayoutRow

DENSE_STATE_FACTOR = 3  # dense weights + Adam's two moments, replicated on every rank
REPORTED_SEQ_LENS = (1_000, 100_000)


@dataclass
class Resource:
    """One memory pool: ``used`` = sum of ``parts`` (bytes) against ``capacity`` (bytes)."""

    name: str
    capacity: int
    parts: Dict[str, int] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return sum(self.parts.values())

    @property
    def utilization(self) -> float:
        return self.used / self.capacity if self.capacity else float("inf")


@dataclass
class CapacityReport:
    """Everything ``muse plan`` prints; ``to_dict`` is the ``--json`` form."""

    inputs: Dict[str, object]
    cluster: Cluster
    embedding: EmbeddingPlan
    unplaced_state_bytes: int
    dense_bytes: int
    mm_table_bytes: int
    mm_bytes_per_host: int
    sequence: List[SequenceMemory]
    configured: SequenceMemory
    resources: List[Resource]
    fits: bool
    binding: str
    layout: List[LayoutRow] = field(default_factory=list)
    measured_layout: Optional[Dict[str, object]] = None
    pq_code_bytes: int = 0  # the approximate GSU's code table (``ModelConfig.pq_m``), one copy per host; 0: exact GSU
    norm_bytes: int = 0  # the GSU's row norms (``RowNorms``), one copy per rank

    def gsu_resident(self) -> Dict[str, object]:
        """What each GSU keeps resident for the whole catalogue, one copy, in bytes, and the two size ratios of the
        approximate GSU: its scanned codes against the exact scan's rows alone, and against rows + row norms
        (what the exact GSU really holds per item). The PQ GSU also keeps the rows and norms (targets' lookup
        tables and the re-scoring read them), so in all it holds more than the exact GSU."""
        exact = self.mm_table_bytes + self.norm_bytes
        out: Dict[str, object] = {"exact": {"rows": self.mm_table_bytes, "row_norms": self.norm_bytes, "total": exact}}
        if self.pq_code_bytes:
            out["pq"] = {"codes_and_codebooks": self.pq_code_bytes, "rows": self.mm_table_bytes,
                         "row_norms": self.norm_bytes, "total": exact + self.pq_code_bytes,
                         "scan_smaller_than_rows": self.mm_table_bytes / self.pq_code_bytes,
                         "scan_smaller_than_rows_and_norms": exact / self.pq_code_bytes,
                         "total_vs_exact": (exact + self.pq_code_bytes) / exact}
        return out

    def to_dict(self) -> Dict[str, object]:
        world = self.cluster.world_size
        return {
            "inputs": self.inputs,
            "cluster": asdict(self.cluster) | {"world_size": world, "ddr_per_rank": self.cluster.ddr_per_rank},
            "embedding_tables": {
                "planner_error": self.embedding.error,
                "unplaced_weights_plus_optimizer_bytes": self.unplaced_state_bytes,
                "shards": [asdict(s) | {"hbm": s.hbm, "ddr": s.ddr, "buffer_bytes": s.buffer_bytes} for s in self.embedding.shards],
                "per_rank": self.embedding.per_rank(world) if not self.embedding.error else [],
            },
            "dense_parameter_bytes": self.dense_bytes,
            "mm_table": {"bytes": self.mm_table_bytes, "bytes_per_host": self.mm_bytes_per_host},
            "pq_codes": {"m": self.inputs.get("pq_m"), "bytes": self.pq_code_bytes, "bytes_per_host": self.pq_code_bytes},
            "row_norms": {"bytes": self.norm_bytes, "bytes_per_host": self.norm_bytes * self.cluster.nproc_per_node},
            "gsu_resident": self.gsu_resident(),
            "sequence_memory_per_rank": [asdict(s) for s in self.sequence],
            "resources": [
                {"name": r.name, "capacity": r.capacity, "used": r.used, "utilization": r.utilization, "parts": r.parts}
                for r in self.resources
            ],
            "data_layout": {
                "computed": [asdict(r) | {"bytes_per_sample": r.bytes_per_sample, "totals": r.totals} for r in self.layout],
                "measured": self.measured_layout,
            },
            "fits": self.fits,
            "binding_constraint": self.binding,
        }

    def to_text(self) -> str:
        out: List[str] = []
        inp = self.inputs
        c = self.cluster
        out.append(
            f"capacity plan: {inp['scale']} | model {inp['model']} (id_dim {inp['id_dim']}, {inp['optimizer']}) | "
            f"{c.nnodes} node(s) x {c.nproc_per_node} {c.compute_device} rank(s), "
            f"{'HBM ' + _gib(c.hbm_bytes) + '/rank, ' if c.compute_device == 'cuda' else ''}"
            f"DDR {_gib(c.ddr_bytes)}/host | batch {inp['batch_size']}/rank, L {inp['seq_len']}"
        )
        out.append("")
        out.append("Embedding tables (TorchRec EmbeddingShardingPlanner); weights = rows x cols x 4,")
        out.append(f"optimizer = {_optimizer_rule(str(inp['optimizer']))}; planner HBM/DDR add I/O buffers:")
        if self.embedding.error:
            out.append(f"  no placement: {self.embedding.error}")
            out.append(f"  weights + optimizer state of all tables: {self.unplaced_state_bytes:,} B ({_gib(self.unplaced_state_bytes)})")
        else:
            rows = [
                [s.rank, f"{s.module}.{s.table}", s.sharding_type, s.compute_kernel, f"{s.rows:,} x {s.cols}",
                 f"{s.weight_bytes:,}", f"{s.optimizer_bytes:,}", f"{s.hbm:,}", f"{s.ddr:,}"]
                for s in self.embedding.shards
            ]
            out.append(tabulate(rows, headers=["rank", "table", "sharding", "kernel", "shard rows x cols", "weights B",
                                               "optimizer B", "HBM B", "DDR B"]))
            out.append("")
            per_rank = self.embedding.per_rank(c.world_size)
            out.append(tabulate(
                [[r, _gib(p["weights"]), _gib(p["optimizer"]), _gib(p["buffers"]), _gib(p["hbm"]), _gib(p["ddr"])] for r, p in enumerate(per_rank)],
                headers=["rank", "weights", "optimizer", "buffers", "HBM", "DDR"],
            ))
        out.append("")
        out.append("Not counted by the planner:")
        out.append(f"  dense parameters {self.dense_bytes:,} B x {DENSE_STATE_FACTOR} (weights + Adam moments) on every rank")
        out.append(
            f"  multimodal table {inp['mm_rows']:,} x {inp['mm_dim']} x {inp['mm_dtype']} = {self.mm_table_bytes:,} B "
            f"({_gib(self.mm_table_bytes)}); {inp['mm_placement']}: {_gib(self.mm_bytes_per_host)} per host"
        )
        if self.norm_bytes:
            out.append(f"  GSU row norms {inp['mm_rows']:,} x {self.norm_bytes // max(1, int(inp['mm_rows']))} B = "
                       f"{self.norm_bytes:,} B ({_gib(self.norm_bytes)}); one copy per rank")
        if self.pq_code_bytes:
            resident = self.gsu_resident()["pq"]
            out.append(f"  PQ codes {inp['mm_rows']:,} x M={inp['pq_m']} uint8 + codebooks = {self.pq_code_bytes:,} B "
                       f"({_gib(self.pq_code_bytes)}); one copy per host. The scan reads them instead of the rows: "
                       f"{resident['scan_smaller_than_rows']:.3f}x smaller than the rows alone, "
                       f"{resident['scan_smaller_than_rows_and_norms']:.3f}x smaller than rows + norms (what the exact "
                       f"GSU keeps per item); the rows and norms stay (targets, re-scoring), so the PQ GSU holds "
                       f"{resident['total']:,} B in all, {resident['total_vs_exact']:.3f}x the exact GSU's")
        out.append(f"  long sequence, per rank and batch of {inp['batch_size']} (GSU chunk {inp['gsu_chunk']:,} gathered rows):")
        out.append(tabulate(
            [[s.seq_len, _gib(s.raw_history), _gib(s.gsu_unchunked), _gib(s.gsu_chunked), _gib(s.device_activations)] for s in self.sequence],
            headers=["L", "raw history (DDR)", "GSU unchunked", "GSU chunked (DDR)", f"ID activations ({'HBM' if c.compute_device == 'cuda' else 'DDR'})"],
        ))
        out.append("")
        if self.layout:
            first = self.layout[0]
            out.append(f"Prepared data (storage, uncompressed; {first.users:,} users, {first.samples:,} train samples): "
                       "history store once per user, sample rows, stored retrieval (`muse retrieve`), and the "
                       "per-sample-history layout for comparison:")
            out.append(tabulate(
                [[r.seq_len, f"{r.history_bytes_per_user:,}", f"{r.bytes_per_sample:,.0f}", f"{r.retrieval_bytes_per_sample:,}",
                  f"{r.per_sample_copy_bytes:,}", f"{r.per_sample_copy_bytes / r.bytes_per_sample:.1f}x",
                  _gib(r.totals["history_store"] + r.totals["sample_shards"]), _gib(r.totals["per_sample_copy_layout"])]
                 for r in self.layout],
                headers=["L", "B/user (store)", "B/sample", "B/sample retrieval", "B/sample (copy layout)", "saved",
                         "store + shards", "copy layout"]))
            out.append("")
        if self.measured_layout:
            out.append("Measured on disk:")
            out.append(tabulate(
                [[split, m["samples"], m["users_with_history"], _gib(m["history_store_bytes"]), _gib(m["sample_shard_bytes"]),
                  f"{m['bytes_per_sample']:,.0f}", f"{m['history_bytes_per_user']:,.0f}"]
                 for split, m in self.measured_layout["splits"].items()],
                headers=["split", "samples", "users", "history store", "sample shards", "B/sample", "B/user"]))
            for name, size in self.measured_layout["retrievals"].items():
                out.append(f"  retrieval {name}: {_gib(size)}")
            out.append("")
        out.append(tabulate(
            [[r.name, _gib(r.used), _gib(r.capacity), f"{100 * r.utilization:.1f}%", ", ".join(f"{k} {_gib(v)}" for k, v in r.parts.items())]
             for r in _most_loaded(self.resources)],
            headers=["resource", "used", "capacity", "use", "parts"],
        ))
        out.append("")
        out.append(f"{'FITS' if self.fits else 'DOES NOT FIT'}: binding constraint: {self.binding}")
        return "\n".join(out)


def assemble(
    inputs: Dict[str, object],
    cluster: Cluster,
    embedding: EmbeddingPlan,
    unplaced_state_bytes: int,
    dense_bytes: int,
    mm_table_bytes: int,
    mm_bytes_per_host: int,
    sequence: List[SequenceMemory],
    configured: SequenceMemory,
    layout: Optional[List[LayoutRow]] = None,
    measured: Optional[Dict[str, object]] = None,
    pq_code_bytes: int = 0,
    norm_bytes: int = 0,
) -> CapacityReport:
    """Sum every resource's parts and decide fits / binding constraint."""
    world = cluster.world_size
    per_rank = embedding.per_rank(world) if not embedding.error else [dict(hbm=0, ddr=0)] * world
    dense = dense_bytes * DENSE_STATE_FACTOR
    on_cuda = cluster.compute_device == "cuda"
    resources: List[Resource] = []
    if on_cuda:
        for r in range(world):
            resources.append(Resource(f"HBM rank {r}", cluster.hbm_bytes, {
                "embeddings": per_rank[r]["hbm"], "dense": dense, "id activations": configured.device_activations}))
    for h in range(cluster.nnodes):
        ranks = range(h * cluster.nproc_per_node, (h + 1) * cluster.nproc_per_node)
        parts = {
            "embeddings": sum(per_rank[r]["ddr"] for r in ranks),
            "multimodal table": mm_bytes_per_host,
            "raw history batches": configured.raw_history * len(ranks),
            "gsu (chunked)": configured.gsu_chunked * len(ranks),
        }
        if norm_bytes:
            parts["gsu row norms"] = norm_bytes * len(ranks)
        if pq_code_bytes:
            parts["pq codes"] = pq_code_bytes
        if not on_cuda:
            parts["dense"] = dense * len(ranks)
            parts["id activations"] = configured.device_activations * len(ranks)
        resources.append(Resource(f"DDR host {h}", cluster.ddr_bytes, parts))
    worst: Optional[Resource] = max(resources, key=lambda r: r.utilization) if resources else None
    if embedding.error:
        fits, binding = False, f"embedding tables: the planner found no placement ({embedding.error})"
    else:
        fits = all(r.used <= r.capacity for r in resources)
        top = max(worst.parts, key=worst.parts.get)
        binding = f"{worst.name}: {_gib(worst.used)} of {_gib(worst.capacity)} ({100 * worst.utilization:.1f}%), largest part {top}"
    return CapacityReport(inputs, cluster, embedding, unplaced_state_bytes, dense_bytes, mm_table_bytes,
                          mm_bytes_per_host, sequence, configured, resources, fits, binding, layout or [], measured,
                          pq_code_bytes, norm_bytes)


def _most_loaded(resources: List[Resource], limit: int = 8) -> List[Resource]:
    """The ``limit`` most utilized resources, so large clusters print a short table."""
    return sorted(resources, key=lambda r: r.utilization, reverse=True)[:limit]


def _optimizer_rule(optimizer: str) -> str:
    return "rows x 4 (row-wise Adagrad)" if optimizer == "rowwise_adagrad" else "2 x rows x cols x 4 (Adam)"


def _gib(n: int) -> str:
    """Bytes in GiB (3 decimals) from 1 GiB up, else MiB / KiB / B."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3f} {unit}"
    return f"{n} B"
