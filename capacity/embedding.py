"""Run TorchRec's ``EmbeddingShardingPlanner`` offline and break its placement down into checkable bytes.

No process group is created: the planner only needs a ``Topology`` and the model on the meta device.
For every shard it places, this module reports

- ``weight_bytes``    = shard rows x shard columns x element size (fp32: 4);
- ``optimizer_bytes`` = the optimizer state the fused kernel allocates for that shard:
  row-wise Adagrad one fp32 per shard row, Adam two fp32 per weight (momentum and variance);
- ``planner_hbm`` / ``planner_ddr``: the planner's own storage estimate, which adds the shard's input
  and output buffers for the configured batch size (and, for caching kernels, the cache) to the above.

The optimizer is made visible to the planner the way TorchRec reads it: each embedding weight carries
``_optimizer_classes`` (what ``apply_optimizer_in_backward`` sets), which drives the planner's optimizer
multiplier.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from torch import nn
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.optimizers import Adam

from capacity.cluster import Cluster
from sharding.planner import Constraints, make_planner
from sharding.sharders import make_sharders

# name -> (TorchRec optimizer class the planner recognises, fp32 values per shard row, per weight)
OPTIMIZERS = {
    "rowwise_adagrad": (RowWiseAdagrad, 1, 0),
    "adam": (Adam, 0, 2),
}
OPTIMIZER_STATE_BYTES = 4


def optimizer_bytes(optimizer: str, rows: int, cols: int) -> int:
    """Optimizer state of one ``rows x cols`` shard: row-wise Adagrad rows x 4, Adam 2 x rows x cols x 4."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown {optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    _, per_row, per_weight = OPTIMIZERS[optimizer]
    return (per_row * rows + per_weight * rows * cols) * OPTIMIZER_STATE_BYTES


@dataclass(frozen=True)
class ShardEstimate:
    """One placed shard of one table. Bytes are exact arithmetic except ``planner_*`` (the planner's estimate)."""

    module: str
    table: str
    sharding_type: str
    compute_kernel: str
    rank: int
    rows: int
    cols: int
    weight_bytes: int
    optimizer_bytes: int
    planner_hbm: int
    planner_ddr: int

    @property
    def state_bytes(self) -> int:
        """Weights + optimizer state: what the kernel allocates for this shard."""
        return self.weight_bytes + self.optimizer_bytes

    @property
    def buffer_bytes(self) -> int:
        """What the planner adds beyond weights and optimizer state (input/output buffers, caches)."""
        return max(0, self.planner_hbm + self.planner_ddr - self.state_bytes)

    @property
    def _shortfall(self) -> int:
        """State the planner under-counted: it scales row-wise optimizer state by a column-wise shard's share
        of the columns, while the kernel keeps one value per row in every shard."""
        return max(0, self.state_bytes - (self.planner_hbm + self.planner_ddr))

    @property
    def hbm(self) -> int:
        """Bytes this shard holds in HBM: the planner's split (plus any shortfall, where the weights live in HBM)."""
        return self.planner_hbm + (self._shortfall if self.planner_hbm > self.planner_ddr else 0)

    @property
    def ddr(self) -> int:
        """Bytes this shard holds in DDR: the planner's split (plus any shortfall, where the weights live in DDR)."""
        return self.planner_ddr + (self._shortfall if self.planner_hbm <= self.planner_ddr else 0)


@dataclass
class EmbeddingPlan:
    """The planner's placement (``sharding_plan``, ``shards``) or why there is none (``error``)."""

    shards: List[ShardEstimate] = field(default_factory=list)
    sharding_plan: Optional[ShardingPlan] = None
    error: Optional[str] = None

    def per_rank(self, world_size: int) -> List[Dict[str, int]]:
        """Per rank: weights, optimizer, buffers, hbm, ddr (bytes)."""
        out = [dict(weights=0, optimizer=0, buffers=0, hbm=0, ddr=0) for _ in range(world_size)]
        for s in self.shards:
            r = out[s.rank]
            r["weights"] += s.weight_bytes
            r["optimizer"] += s.optimizer_bytes
            r["buffers"] += s.buffer_bytes
            r["hbm"] += s.hbm
            r["ddr"] += s.ddr
        return out


def mark_optimizer(module: nn.Module, optimizer: str) -> None:
    """Tag every embedding weight with the optimizer class, as ``apply_optimizer_in_backward`` would."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown {optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    cls = OPTIMIZERS[optimizer][0]
    for sub in module.modules():
        if isinstance(sub, (EmbeddingCollection, EmbeddingBagCollection)):
            for p in sub.parameters():
                p._optimizer_classes = [cls]  # read by the planner's storage estimator


def plan_embeddings(
    module: nn.Module,
    cluster: Cluster,
    batch_size: int,
    optimizer: str,
    constraints: Optional[Constraints] = None,
    hbm_reserve: float = 0.15,
    sharders: Optional[Sequence[ModuleSharder[nn.Module]]] = None,
) -> EmbeddingPlan:
    """Plan ``module``'s embedding tables (module on meta) for ``cluster`` with the trainer's planner
    (``sharding.planner.make_planner``) and sharders (``sharding.sharders.make_sharders`` by default).

    batch_size is per rank (the planner's convention). ``hbm_reserve`` is the fraction of HBM the
    planner keeps free for everything it does not place (TorchRec's default margin, 15%).
    """
    mark_optimizer(module, optimizer)
    planner = make_planner(cluster.topology(), constraints, batch_size, hbm_reserve)
    try:
        sharding_plan = planner.plan(module, list(sharders) if sharders is not None else make_sharders())
    except PlannerError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return EmbeddingPlan(error=first)
    shards = []
    # The public ShardingPlan carries no byte estimates; the planner keeps its chosen options (with each
    # shard's storage estimate) in _best_plan.
    for option in planner._best_plan or []:
        elem = option.tensor.element_size()
        for shard in option.shards:
            rows, cols = int(shard.size[0]), int(shard.size[1])
            shards.append(
                ShardEstimate(
                    module=option.path,
                    table=option.name,
                    sharding_type=option.sharding_type,
                    compute_kernel=option.compute_kernel,
                    rank=int(shard.rank),
                    rows=rows,
                    cols=cols,
                    weight_bytes=rows * cols * elem,
                    optimizer_bytes=optimizer_bytes(optimizer, rows, cols),
                    planner_hbm=int(shard.storage.hbm),
                    planner_ddr=int(shard.storage.ddr),
                )
            )
    shards.sort(key=lambda s: (s.rank, s.module, s.table))
    return EmbeddingPlan(shards=shards, sharding_plan=sharding_plan)


def unplaced_state_bytes(module: nn.Module, optimizer: str) -> int:
    """Weights + optimizer state of every embedding table, unsharded (the floor any placement must hold)."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, (EmbeddingCollection, EmbeddingBagCollection)):
            for p in sub.parameters():
                rows, cols = int(p.shape[0]), int(p.shape[1])
                total += rows * cols * p.element_size() + optimizer_bytes(optimizer, rows, cols)
    return total


def dense_parameter_bytes(module: nn.Module) -> int:
    """Bytes of the non-embedding (replicated, data-parallel) parameters."""
    emb = {id(p) for sub in module.modules() if isinstance(sub, (EmbeddingCollection, EmbeddingBagCollection)) for p in sub.parameters()}
    return sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in emb)

