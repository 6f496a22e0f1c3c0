"""Per-table sharding constraints from the training config: which sharding types and compute kernels
the planner may choose for a table.

Text form (the ``--shard`` flag, repeatable): ``TABLE=TYPE[,TYPE...][:KERNEL[,KERNEL...]]``, e.g.
``item=row_wise``, ``user=table_wise,row_wise:fused``.

By default (``with_fused_defaults``) every ID table is kept off ``data_parallel``: a sharded table has a
fused kernel and is trained by the in-backward embedding optimizer, a data-parallel one would be a
replicated dense parameter trained by the dense optimizer. Left to itself the planner makes small
tables data-parallel at some world sizes and not at others, so a table's optimizer (and the state
keys of a checkpoint) would depend on the world size and a checkpoint could not be resumed at
another one. A user constraint that allows ``data_parallel`` for a table is kept as given; a table
the planner may make data-parallel at one world size and shard at another cannot be resumed
across those world sizes (the trainer refuses it with a one-line error).
"""

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Tuple

from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType

SHARDING_TYPES = tuple(t.value for t in ShardingType)
COMPUTE_KERNELS = tuple(k.value for k in EmbeddingComputeKernel)
# Every type whose kernel is fused (the planner keeps those a sharder does not offer on the device);
# grid_shard is left out as TorchRec's planner only uses it when asked for by name.
FUSED_SHARDING_TYPES = tuple(
    t for t in SHARDING_TYPES if t not in (ShardingType.DATA_PARALLEL.value, ShardingType.GRID_SHARD.value)
)


@dataclass(frozen=True)
class TableConstraint:
    """Allowed sharding types / compute kernels for one table; empty = planner's choice."""

    sharding_types: Tuple[str, ...] = ()
    compute_kernels: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for value in self.sharding_types:
            if value not in SHARDING_TYPES:
                raise ValueError(f"sharding_types: unknown sharding type {value!r}; choose from {', '.join(SHARDING_TYPES)}")
        for value in self.compute_kernels:
            if value not in COMPUTE_KERNELS:
                raise ValueError(f"compute_kernels: unknown compute kernel {value!r}; choose from {', '.join(COMPUTE_KERNELS)}")

    def to_torchrec(self) -> ParameterConstraints:
        return ParameterConstraints(
            sharding_types=list(self.sharding_types) or None,
            compute_kernels=list(self.compute_kernels) or None,
        )


def parse_constraint(text: str) -> Tuple[str, TableConstraint]:
    """``"item=row_wise:fused"`` -> ("item", TableConstraint(("row_wise",), ("fused",))). ValueError if malformed."""
    table, sep, rest = text.partition("=")
    if not sep or not table or not rest:
        raise ValueError(f"expected TABLE=TYPE[,TYPE][:KERNEL[,KERNEL]], got {text!r}")
    types, _, kernels = rest.partition(":")
    return table.strip(), TableConstraint(_split(types), _split(kernels))


def _split(text: str) -> Tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_constraints(texts: Iterable[str]) -> Dict[str, TableConstraint]:
    return dict(parse_constraint(t) for t in texts)



def with_fused_defaults(constraints: Mapping[str, TableConstraint], tables: Iterable[str]) -> Dict[str, TableConstraint]:
    """``constraints`` plus, for each of ``tables`` whose sharding types are not given, the types in
    ``FUSED_SHARDING_TYPES`` (its compute kernels, if given, are kept): no table becomes
    data-parallel unless a constraint names ``data_parallel``."""
    out = dict(constraints)
    for table in tables:
        given = out.get(table, TableConstraint())
        if not given.sharding_types:
            out[table] = TableConstraint(FUSED_SHARDING_TYPES, given.compute_kernels)
    return out
