"""The model as the trainer runs it: built on meta, planned, sharded by DistributedModelParallel, with
its combined optimizer, and the state that a checkpoint holds."""

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingType
from torchrec.optim.keyed import CombinedOptimizer

from model.muse import build_model
from model.train_module import MuseTrain
from sharding.constraints import parse_constraints, with_fused_defaults
from sharding.planner import PlanRow, format_plan, make_planner, plan_table, table_shapes
from sharding.sharders import make_sharders
from sharding.topology import detect_cluster, make_topology
from training.config import TrainConfig
from training.distributed import DistEnv
from training.optim import attach_embedding_optimizer, make_optimizer


@dataclass
class ShardedModel:
    """``dmp`` wraps ``MuseTrain(MuseModel)``: forward(batch) -> (loss, (loss, logits, labels))."""

    dmp: DistributedModelParallel
    optimizer: CombinedOptimizer
    plan_rows: List[PlanRow]

    @property
    def data_parallel_tables(self) -> List[str]:
        """Tables the plan replicates (trained by the dense optimizer, not the fused one), sorted."""
        return sorted(r.table for r in self.plan_rows if r.sharding_type == ShardingType.DATA_PARALLEL.value)

    def sync_buffers(self) -> None:
        """Give every rank rank 0's dense buffers (BatchNorm running statistics of the Dice units).

        DDP broadcasts them at the start of each training forward, but a rank's own batch then updates
        its copy; evaluation and checkpoints must see one value on all ranks.
        """
        for module in self.dmp.modules():
            if isinstance(module, DistributedDataParallel):
                for buffer in module.module.buffers():
                    dist.broadcast(buffer, src=0)

    def checkpoint_state(self) -> Dict[str, Any]:
        """The DCP state dict: sharded model weights and buffers, fused + dense optimizer state."""
        self.sync_buffers()
        return {"model": self.dmp.state_dict(), "optim": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Apply a state dict filled by ``dcp.load`` (tensors were loaded in place)."""
        self.dmp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])


def build_sharded_model(config: TrainConfig, env: DistEnv, vocab_sizes: Mapping[str, int]) -> ShardedModel:
    """Plan (rank 0 plans, all receive), shard and initialise the model of ``config`` on ``env``."""
    module = MuseTrain(build_model(config.model, vocab_sizes, device="meta"))
    attach_embedding_optimizer(module, config)
    sharders = make_sharders()
    topology = make_topology(detect_cluster(env.world_size, env.local_world_size, env.device))
    constraints = with_fused_defaults(parse_constraints(config.shard), table_shapes(module))
    planner = make_planner(topology, constraints, batch_size=config.batch_size)
    plan = planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
    rows = plan_table(plan, env.world_size, table_shapes(module))
    dmp = DistributedModelParallel(module, device=env.device, plan=plan, sharders=sharders)
    return ShardedModel(dmp, make_optimizer(dmp, config), rows)


def plan_text(model: ShardedModel) -> str:
    return format_plan(model.plan_rows)
