"""sharding/: topology, constraints, the offline plan and its table, and the CPU row-wise EBC override."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from model.config import ModelConfig
from model.muse import build_model
from model.train_module import MuseTrain
from sharding.constraints import FUSED_SHARDING_TYPES, TableConstraint, parse_constraint, parse_constraints, with_fused_defaults
from sharding.planner import format_plan, make_planner, plan_table, table_shapes
from sharding.sharders import RowWiseCpuEmbeddingBagCollectionSharder, make_sharders
from sharding.topology import GIB, ClusterSpec, make_topology
from tests.model_inputs import SMALL_VOCAB


def test_topology_from_cluster_spec():
    topology = make_topology(ClusterSpec(world_size=4, local_world_size=2, compute_device="cpu", ddr_bytes=3 * GIB))
    assert topology.world_size == 4 and topology.local_world_size == 2 and topology.compute_device == "cpu"
    assert [d.storage.ddr for d in topology.devices] == [3 * GIB] * 4
    assert [d.storage.hbm for d in topology.devices] == [0] * 4


@pytest.mark.parametrize("kwargs", [dict(world_size=0, local_world_size=1), dict(world_size=4, local_world_size=3),
                                    dict(world_size=2, local_world_size=2, compute_device="tpu")])
def test_cluster_spec_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        ClusterSpec(**kwargs)


def test_parse_constraints():
    assert parse_constraint("item=row_wise") == ("item", TableConstraint(("row_wise",), ()))
    assert parse_constraint("user=table_wise,row_wise:fused") == ("user", TableConstraint(("table_wise", "row_wise"), ("fused",)))
    for bad in ("item", "=row_wise", "item=sideways", "item=row_wise:warp"):
        with pytest.raises(ValueError):
            parse_constraint(bad)
    pc = TableConstraint(("column_wise",)).to_torchrec()
    assert pc.sharding_types == ["column_wise"] and pc.compute_kernels is None


def test_cpu_sharder_offers_row_wise_for_ebc():
    ebc_sharder, ec_sharder = make_sharders()
    assert isinstance(ebc_sharder, RowWiseCpuEmbeddingBagCollectionSharder)
    assert ShardingType.ROW_WISE.value in ebc_sharder.sharding_types("cpu")
    assert ShardingType.ROW_WISE.value in ec_sharder.sharding_types("cpu")
    plain_ebc, _ = make_sharders(row_wise_on_cpu=False)
    assert ShardingType.ROW_WISE.value not in plain_ebc.sharding_types("cpu")


def test_offline_plan_honours_constraints_and_counts_bytes():
    module = MuseTrain(build_model(ModelConfig.preset("muse"), SMALL_VOCAB, device="meta"))
    constraints = parse_constraints(["item=row_wise", "user=row_wise", "category=table_wise", "profile_1=data_parallel"])
    planner = make_planner(make_topology(ClusterSpec(world_size=2, local_world_size=2)), constraints, batch_size=64)
    plan = planner.plan(module, make_sharders())
    shapes = table_shapes(module)
    rows = {r.table: r for r in plan_table(plan, 2, shapes)}
    assert set(rows) == set(shapes)
    assert rows["item"].sharding_type == "row_wise" and rows["user"].sharding_type == "row_wise"
    assert rows["category"].sharding_type == "table_wise" and rows["profile_1"].sharding_type == "data_parallel"
    for table, row in rows.items():
        full = shapes[table][0] * shapes[table][1] * 4
        if row.sharding_type == "data_parallel":
            assert row.ranks == (0, 1) and row.bytes_per_rank == (full, full)
        else:
            assert sum(row.bytes_per_rank) == full
    assert rows["item"].ranks == (0, 1) and len(rows["category"].ranks) == 1
    text = format_plan(list(rows.values()))
    assert text.splitlines()[0].split()[:3] == ["table", "sharding", "type"]
    assert all(table in text for table in shapes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row_wise_rank(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        tables = [EmbeddingBagConfig(name="user", embedding_dim=8, num_embeddings=101, feature_names=["user_id"]),
                  EmbeddingBagConfig(name="city", embedding_dim=8, num_embeddings=13, feature_names=["city"])]
        torch.manual_seed(0)
        reference = EmbeddingBagCollection(tables=tables)
        planner = make_planner(make_topology(ClusterSpec(world_size, world_size)),
                               parse_constraints(["user=row_wise", "city=row_wise"]), batch_size=4)
        module = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        sharders = make_sharders()
        plan = planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
        assert {ps.sharding_type for ps in plan.plan[""].values()} == {"row_wise"}
        dmp = DistributedModelParallel(module, device=torch.device("cpu"), plan=plan, sharders=sharders)
        with torch.no_grad():
            for name, target in dmp.state_dict().items():
                for shard in target.local_shards():
                    r0, c0 = shard.metadata.shard_offsets
                    h, w = shard.tensor.shape
                    shard.tensor.copy_(reference.state_dict()[name][r0:r0 + h, c0:c0 + w])
        g = torch.Generator().manual_seed(10 + rank)
        lengths = torch.randint(0, 4, (2 * 6,), generator=g)
        values = torch.cat([torch.randint(0, 101, (int(lengths[:6].sum()),), generator=g),
                            torch.randint(0, 13, (int(lengths[6:].sum()),), generator=g)])
        kjt = KeyedJaggedTensor.from_lengths_sync(["user_id", "city"], values, lengths)
        sharded = dmp(kjt).wait().values()
        results[rank] = (sharded - reference(kjt).values()).abs().max().item()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_row_wise_ebc_override_equals_unsharded():
    results = mp.Manager().dict()
    mp.spawn(_row_wise_rank, args=(2, _free_port(), results), nprocs=2)
    assert sorted(results.keys()) == [0, 1]
    assert max(results.values()) < 1e-6  # pooled sums in another order: equal up to float rounding


# Vocabulary of the tests' prepared dataset (tests/conftest.py): small profile tables.
FIXTURE_VOCAB = {"user": 196, "item": 1607, "category": 16, "profile_1": 9, "profile_2": 3, "profile_3": 148,
                 "profile_4": 34, "profile_5": 12, "item_city": 300, "item_province": 34}


def _plan_types(world_size: int, constraints, batch_size: int = 256) -> dict:
    from training.config import TrainConfig
    from training.optim import attach_embedding_optimizer

    module = MuseTrain(build_model(ModelConfig.preset("muse"), FIXTURE_VOCAB, device="meta"))
    attach_embedding_optimizer(module, TrainConfig(data="unused"))
    planner = make_planner(make_topology(ClusterSpec(world_size, world_size)), constraints(module), batch_size=batch_size)
    plan = planner.plan(module, make_sharders())
    return {r.table: r.sharding_type for r in plan_table(plan, world_size, table_shapes(module))}


def test_fused_defaults_keep_every_table_off_data_parallel_at_any_world_size():
    free = _plan_types(2, lambda m: None)
    assert "data_parallel" in free.values(), "premise: left alone, the planner replicates small tables at 2 ranks"
    assert "data_parallel" not in _plan_types(1, lambda m: None).values()
    for world_size in (1, 2):
        types = _plan_types(world_size, lambda m: with_fused_defaults({}, table_shapes(m)))
        assert set(types) == set(FIXTURE_VOCAB) and "data_parallel" not in types.values(), (world_size, types)
    user = parse_constraints(["profile_2=data_parallel", "item=:fused"])
    types = _plan_types(2, lambda m: with_fused_defaults(user, table_shapes(m)))
    assert types["profile_2"] == "data_parallel" and types["item"] != "data_parallel"


def test_with_fused_defaults_keeps_user_types_and_kernels():
    out = with_fused_defaults(parse_constraints(["item=row_wise", "user=:fused"]), ["item", "user", "category"])
    assert out["item"] == TableConstraint(("row_wise",), ())
    assert out["user"] == TableConstraint(FUSED_SHARDING_TYPES, ("fused",))
    assert out["category"] == TableConstraint(FUSED_SHARDING_TYPES, ())
    assert "data_parallel" not in FUSED_SHARDING_TYPES
