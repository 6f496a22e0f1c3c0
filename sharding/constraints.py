"""Per-table sharding constraints from the training config: which sharding types and compute kernels
the planner may choose for a table.

Text form (the ``--shard`` flag, repeatable): ``TABLE=TYPE[,TYPE...][:KERNEL[,KERNEL...]]``, e.g.
``item=row_wise``, ``user=table_wise,row_wise:fused``.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, Tuple

from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType

SHARDING_TYPES = tuple(t.value for t in ShardingType)
COMPUTE_KERNELS = tuple(k.value for k in EmbeddingComputeKernel)


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

