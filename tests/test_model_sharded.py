"""The model sharded under DistributedModelParallel on 2 gloo ranks computes what the unsharded model computes.

Each rank builds the unsharded model (same seed on both ranks), a DMP copy from a "meta" model, copies the
unsharded weights into the shards, and compares logits on its own local batch; then one step of TorchRec's
TrainPipelineSparseDist (which fx-traces MuseModel.forward to find the sparse inputs) must return the same
logits for its first batch.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from model.config import ModelConfig
from model.muse import build_model
from model.tables import SPARSE_TABLES
from model.train_module import MuseTrain
from tests.model_inputs import SMALL_VOCAB, random_batch

WORLD_SIZE = 2
PRESETS = ("muse", "twin")
# Forced plans on top of the planner's own choice: sequence (EC) tables / sparse (EBC) tables.
FORCED = {
    "table_wise": (ShardingType.TABLE_WISE, ShardingType.TABLE_WISE),
    "row_wise+column_wise": (ShardingType.ROW_WISE, ShardingType.COLUMN_WISE),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _constraints(sequence: ShardingType, sparse: ShardingType) -> dict[str, ParameterConstraints]:
    constraints = {space: ParameterConstraints(sharding_types=[sequence.value]) for space in ("item", "category")}
    constraints |= {space: ParameterConstraints(sharding_types=[sparse.value]) for space in SPARSE_TABLES.values()}
    return constraints


def _copy_into_shards(sharded: dict, full: dict) -> None:
    """Copy full tensors into the (possibly sharded) tensors of a DMP state dict, in place."""
    assert set(sharded) == set(full), set(sharded) ^ set(full)
    with torch.no_grad():
        for name, target in sharded.items():
            source = full[name]
            if isinstance(target, ShardedTensor):
                for shard in target.local_shards():
                    rows, cols = shard.metadata.shard_offsets
                    height, width = shard.tensor.shape
                    shard.tensor.copy_(source[rows : rows + height, cols : cols + width])
            else:
                target.copy_(source)


def _sharded_model(cfg: ModelConfig, reference: torch.nn.Module, constraints) -> DistributedModelParallel:
    model = build_model(cfg, SMALL_VOCAB, device="meta")
    sharders = get_default_sharders()
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=WORLD_SIZE, compute_device="cpu"), constraints=constraints)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    # Lazy init from "meta" leaves sane dense state (Dice's norm statistics start at mean 0, variance 1).
    variances = [b for n, b in dmp.named_buffers() if n.endswith("running_var")]
    assert variances and all(torch.equal(v, torch.ones_like(v)) for v in variances)
    _copy_into_shards(dmp.state_dict(), reference.state_dict())
    return dmp


def _pipeline_logits(cfg: ModelConfig, reference: torch.nn.Module, batches: list) -> torch.Tensor:
    model = build_model(cfg, SMALL_VOCAB, device="meta")
    dmp = DistributedModelParallel(MuseTrain(model), device=torch.device("cpu"))
    _copy_into_shards(dmp.state_dict(), {f"model.{k}": v for k, v in reference.state_dict().items()})
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda p: torch.optim.SGD(p, lr=0.01))
    optimizer = CombinedOptimizer([dense, dmp.fused_optimizer])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"))
    _, logits, _ = pipeline.progress(iter(batches))
    # The tracer found both sparse modules fed straight from the batch, so their input dist is pipelined.
    assert len(pipeline._pipelined_modules) == 2, pipeline._pipelined_modules
    return logits


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        for name in PRESETS:
            cfg = ModelConfig.preset(name)
            torch.manual_seed(0)
            reference = build_model(cfg, SMALL_VOCAB)
            batches = [random_batch(cfg, batch_size=6, seed=10 * rank + i) for i in range(2)]
            expected = reference(batches[0])
            plans = {"planner": None} | {k: _constraints(*v) for k, v in FORCED.items()}
            for plan_name, constraints in plans.items():
                got = _sharded_model(cfg, reference, constraints)(batches[0])
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}/{plan_name}: {m}")
            torch.testing.assert_close(_pipeline_logits(cfg, reference, batches), expected.detach(), atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_model_matches_unsharded_on_two_gloo_ranks():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD_SIZE, join=True)
