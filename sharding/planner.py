"""The embedding sharding plan: TorchRec's planner on a Topology, and the plan as a table.

``make_planner`` and ``plan_table`` need no process group, so the offline capacity plan
(``capacity/``) uses them as they are; the trainer calls ``planner.collective_plan`` instead of
``planner.plan`` (rank 0 plans, the others receive its plan).
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple, Union

from tabulate import tabulate
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from sharding.constraints import TableConstraint

Constraints = Mapping[str, Union[TableConstraint, ParameterConstraints]]


@dataclass(frozen=True)
class PlanRow:
    """One table of the plan. ``ranks`` and ``bytes_per_rank`` are aligned; bytes are the weights
    only (rows x columns x element size of the shard on that rank), without optimizer state."""

    module: str
    table: str
    sharding_type: str
    compute_kernel: str
    ranks: Tuple[int, ...]
    bytes_per_rank: Tuple[int, ...]


def make_planner(
    topology: Topology,
    constraints: Optional[Constraints] = None,
    batch_size: Optional[int] = None,
    reserved_fraction: float = 0.15,
) -> EmbeddingShardingPlanner:
    """An ``EmbeddingShardingPlanner`` for ``topology`` with per-table ``constraints`` (either form).

    ``batch_size`` is the per-rank batch the planner's cost model assumes (TorchRec's default if None);
    ``reserved_fraction`` of each rank's memory is kept for dense parameters and activations.
    """
    parameter_constraints: Dict[str, ParameterConstraints] = {}
    for table, c in (constraints or {}).items():
        parameter_constraints[table] = c.to_torchrec() if isinstance(c, TableConstraint) else c
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=parameter_constraints or None,
        storage_reservation=FixedPercentageStorageReservation(percentage=reserved_fraction),
        stats=NoopEmbeddingStats(),
        debug=False,
    )


def table_shapes(module: nn.Module) -> Dict[str, Tuple[int, int]]:
    """table name -> (rows, dim) for every EmbeddingCollection/EmbeddingBagCollection in ``module``
    (works on a module built on the meta device)."""
    shapes: Dict[str, Tuple[int, int]] = {}
    for sub in module.modules():
        if isinstance(sub, EmbeddingBagCollection):
            configs = sub.embedding_bag_configs()
        elif isinstance(sub, EmbeddingCollection):
            configs = sub.embedding_configs()
        else:
            continue
        for cfg in configs:
            shapes[cfg.name] = (cfg.num_embeddings, cfg.embedding_dim)
    return shapes


def plan_table(
    plan: ShardingPlan,
    world_size: int,
    shapes: Mapping[str, Tuple[int, int]],
    element_bytes: int = 4,
) -> List[PlanRow]:
    """One ``PlanRow`` per table of ``plan``, sorted by module then table.

    ``shapes`` gives (rows, dim) per table (``table_shapes(model)``); a data-parallel table is
    replicated on all ``world_size`` ranks, a sharded one is read from its shard metadata.
    """
    rows: List[PlanRow] = []
    for module_path, module_plan in sorted(plan.plan.items()):
        for table, ps in sorted(module_plan.items()):
            per_rank: Dict[int, int] = {}
            if ps.sharding_type == ShardingType.DATA_PARALLEL.value or ps.sharding_spec is None:
                n_rows, dim = shapes[table]
                per_rank = {r: n_rows * dim * element_bytes for r in range(world_size)}
            else:
                for shard in ps.sharding_spec.shards:
                    rank = shard.placement.rank()
                    size = shard.shard_sizes[0] * shard.shard_sizes[1] * element_bytes
                    per_rank[rank] = per_rank.get(rank, 0) + size
            ranks = tuple(sorted(per_rank))
            rows.append(
                PlanRow(module_path, table, ps.sharding_type, ps.compute_kernel, ranks, tuple(per_rank[r] for r in ranks))
            )
    return rows


def format_plan(rows: List[PlanRow]) -> str:
    """The plan as a text table: table, sharding type, kernel, ranks, bytes per rank."""
    body = [
        (
            r.table,
            r.sharding_type,
            r.compute_kernel,
            ",".join(map(str, r.ranks)),
            " ".join(_human(b) for b in r.bytes_per_rank),
        )
        for r in rows
    ]
    return tabulate(body, headers=("table", "sharding type", "kernel", "ranks", "bytes per rank"), tablefmt="simple")


def _human(n: int) -> str:
    """Bytes in B/KiB/MiB/GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"
