"""Capacity planning: preset arithmetic against hand-computed bytes, the verdict, and the planner's
byte estimates against the tensors DistributedModelParallel really allocates."""

import json
import os
import socket

import pytest
import torch

from capacity.cluster import GIB, Cluster, cluster_from_gib
from capacity.embedding import optimizer_bytes, plan_embeddings
from capacity.extras import mm_bytes_per_host, mm_table_bytes, sequence_memory
from capacity.plan import Workload, plan_capacity
from capacity.scale import from_prepared, preset
from cli.main import main
from common.errors import DataError, UserError
from model.config import ModelConfig
from model.muse import build_model
from sharding.constraints import TableConstraint

FULL_ITEMS = 243_000_000
P90_ITEMS = 35_400_000
USERS = 8_790_000
CATEGORIES = 26_000
ID_DIM = 16


def _table_totals(report):
    """table -> (rows, weight bytes, optimizer bytes) summed over the plan's shards."""
    totals = {}
    for s in report.embedding.shards:
        rows, w, o = totals.get(s.table, (0, 0, 0))
        # row-wise and table-wise shards partition rows; a column-wise shard repeats them
        totals[s.table] = (rows + (s.rows if s.sharding_type != "column_wise" else 0), w + s.weight_bytes, o + s.optimizer_bytes)
    return totals


@pytest.mark.parametrize("name,items", [("taobao-mm-p90", P90_ITEMS), ("taobao-mm-full", FULL_ITEMS)])
def test_preset_table_bytes_match_hand_arithmetic(name, items):
    workload = Workload(ModelConfig.preset("muse"), optimizer="rowwise_adagrad", batch_size=1000, seq_len=1000)
    report = plan_capacity(workload, preset(name), cluster_from_gib(2, 8, 80, 1024, "cuda"))
    assert report.embedding.error is None
    totals = _table_totals(report)
    for table, rows in (("item", items + 1), ("user", USERS + 1), ("category", CATEGORIES + 1)):
        _, weights, opt = totals[table]
        assert weights == rows * ID_DIM * 4
        assert opt == rows * 4  # row-wise Adagrad: one fp32 per row
    assert report.mm_table_bytes == (items + 1) * 128
    assert report.mm_bytes_per_host == (items + 1) * 128  # int8, one copy per host
    per_rank = report.embedding.per_rank(16)
    assert sum(r["weights"] for r in per_rank) == sum(t[1] for t in totals.values())
    assert report.fits


def test_adam_state_is_twice_the_weights():
    workload = Workload(ModelConfig.preset("muse"), optimizer="adam")
    report = plan_capacity(workload, preset("taobao-mm-p90"), cluster_from_gib(1, 8, 80, 1024, "cuda"))
    _, weights, opt = _table_totals(report)["item"]
    assert weights == (P90_ITEMS + 1) * ID_DIM * 4
    assert opt == 2 * weights


def test_multimodal_and_sequence_arithmetic():
    rows = FULL_ITEMS + 1
    assert mm_table_bytes(rows, 128, "int8") == 31_104_000_128
    assert mm_table_bytes(rows, 128, "bf16") == 2 * 31_104_000_128
    assert mm_table_bytes(rows, 128, "fp32") == 4 * 31_104_000_128
    # sharded over 2 hosts x 8 ranks: ceil(rows / 16) rows per rank, 8 ranks per host
    assert mm_bytes_per_host(rows, 128, "int8", "sharded", 2, 8) == 8 * 15_187_501 * 128
    mem = sequence_memory(batch_size=1000, seq_len=100_000, mm_dim=128, mm_dtype="int8", chunk=4096, id_dim=16, k=50,
                          recent_len=50, gsu="multimodal")
    assert mem.raw_history == 1000 * 100_000 * 16
    assert mem.gsu_unchunked == 1000 * 100_000 * 128 * 5 + 1000 * 100_000 * 4
    assert mem.gsu_chunked == 4096 * (128 + 16 * 4) + 1000 * 50 * 8
    assert mem.device_activations == 1000 * (1 + 50 + 50) * 2 * 16 * 4 * 2
    in_model = sequence_memory(1000, 100_000, 128, "int8", 4096, 16, 50, 50, "attention")
    assert in_model.device_activations == 1000 * (1 + 50 + 50 + 100_000) * 2 * 16 * 4 * 2


def test_multimodal_table_binds_when_host_memory_is_short():
    workload = Workload(ModelConfig.preset("muse"))
    report = plan_capacity(workload, preset("taobao-mm-full"), cluster_from_gib(1, 8, 80, 28, "cuda"))
    assert not report.fits
    assert report.binding.startswith("DDR host 0")
    assert "largest part multimodal table" in report.binding


def test_planner_failure_is_reported_as_does_not_fit():
    workload = Workload(ModelConfig.preset("muse"))
    report = plan_capacity(workload, preset("taobao-mm-full"), cluster_from_gib(1, 1, 4, 8, "cuda"))
    assert not report.fits
    assert report.embedding.error
    assert report.binding.startswith("embedding tables")
    assert report.unplaced_state_bytes >= (FULL_ITEMS + 1) * (ID_DIM * 4 + 4)


def test_cli_writes_json_and_exit_status(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--preset", "taobao-mm-p90", "--nnodes", "1", "--nproc-per-node", "4", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["fits"] is True
    assert payload["mm_table"]["bytes"] == (P90_ITEMS + 1) * 128
    assert "FITS" in capsys.readouterr().out
    assert main(["plan", "--preset", "taobao-mm-full", "--nproc-per-node", "8", "--ddr-gb", "28"]) == 1
    assert main(["plan", "--preset", "taobao-mm-full", "--nnodes", "0"]) == 2
    assert "--nnodes" in capsys.readouterr().err
    assert main(["plan", "--preset", "taobao-mm-p90", "--compute-device", "cpu", "--optimizer", "adam"]) == 2
    assert "--optimizer" in capsys.readouterr().err


def test_scale_from_prepared_metadata(tmp_path):
    sizes = {s: 10 for s in ("user", "item", "category", "profile_1", "profile_2", "profile_3", "profile_4", "profile_5",
                             "item_city", "item_province")}
    (tmp_path / "metadata.json").write_text(json.dumps({"schema_version": 1, "vocab_sizes": sizes, "mm_dim": 128}))
    scale = from_prepared(str(tmp_path))
    assert scale.rows("item") == 11
    with pytest.raises(UserError, match="--data"):
        from_prepared(str(tmp_path / "missing"))
    (tmp_path / "metadata.json").write_text(json.dumps({"vocab_sizes": {"user": 3}}))
    with pytest.raises(DataError, match="vocab_sizes"):
        from_prepared(str(tmp_path))


def test_data_layout_arithmetic_and_the_measured_store(prepared_dataset, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--preset", "taobao-mm-p90", "--nproc-per-node", "4", "--json", str(out)]) == 0
    rows = {r["seq_len"]: r for r in json.loads(out.read_text())["data_layout"]["computed"]}
    users, samples = 8_790_000, 8_790_000 * 11  # presets: the release's ~11 samples per user
    row = rows[1000]
    assert row["history_bytes_per_user"] == 1000 * (4 + 2) + 16 + 20  # 26K categories fit int16
    assert row["sample_row_bytes"] == 49 and row["retrieval_bytes_per_sample"] == 50 * 12 + 4 + 50 * 4
    assert row["per_sample_copy_bytes"] == 1000 * 8 + 89
    assert row["bytes_per_sample"] == pytest.approx(49 + row["history_bytes_per_user"] * users / samples)
    assert row["totals"]["history_store"] == row["history_bytes_per_user"] * users
    assert main(["plan", "--data", prepared_dataset, "--compute-device", "cpu", "--nproc-per-node", "1",
                 "--json", str(out)]) == 0
    measured = json.loads(out.read_text())["data_layout"]["measured"]["splits"]["train"]
    store = os.path.join(prepared_dataset, "train", "histories")
    assert measured["history_store_bytes"] == sum(os.path.getsize(os.path.join(store, f)) for f in os.listdir(store))
    assert measured["samples"] == json.load(open(os.path.join(prepared_dataset, "metadata.json")))["splits"]["train"]["rows"]


def test_optimizer_bytes_rules():
    assert optimizer_bytes("rowwise_adagrad", 1000, 16) == 4000
    assert optimizer_bytes("adam", 1000, 16) == 2 * 1000 * 16 * 4
    with pytest.raises(ValueError, match="optimizer"):
        optimizer_bytes("sgd", 1, 1)


# ---- the planner's estimates against what DMP allocates (2 gloo ranks) ----

VOCAB = dict(user=1000, item=5000, category=100, profile_1=10, profile_2=10, profile_3=10, profile_4=10, profile_5=10,
             item_city=20, item_province=5)
# A mix of every non-replicated sharding type (data-parallel tables keep a lazily created dense optimizer state).
CONSTRAINTS = {
    "item": TableConstraint(("row_wise",)),
    "user": TableConstraint(("column_wise",)),
    "category": TableConstraint(("table_wise",)),
    **{t: TableConstraint(("table_wise",)) for t in ("profile_1", "profile_2", "profile_3", "profile_4", "profile_5", "item_city", "item_province")},
}


WEIGHT_BUFFERS = ("weights_host", "weights_dev", "weights_uvm")
STATE_BUFFERS = tuple(f"momentum{i}_{where}" for i in (1, 2) for where in ("host", "dev", "uvm"))


def _allocated(dmp):
    """(weight bytes, optimizer-state bytes) of every fused embedding kernel (fbgemm TBE) of this rank."""
    weights = state = 0
    for module in dmp.modules():
        for lookup in getattr(module, "_lookups", []):
            for emb in getattr(lookup, "_emb_modules", []):
                tensors = dict(emb._emb_module.named_buffers()) | dict(emb._emb_module.named_parameters())
                for name, tensor in tensors.items():
                    size = tensor.numel() * tensor.element_size()
                    if name in WEIGHT_BUFFERS:
                        weights += size
                    elif name in STATE_BUFFERS and tensor.numel() > 1:  # numel 1 = placeholder of an unused state
                        state += size
    return weights, state


def _rank_main(rank, world_size, port, optimizer, plan, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from capacity.embedding import OPTIMIZERS
    from sharding.sharders import make_sharders

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = build_model(ModelConfig.preset("muse"), VOCAB, device="meta")
        tables = [p for m in model.modules() if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection)) for p in m.parameters()]
        apply_optimizer_in_backward(OPTIMIZERS[optimizer][0], tables, {"lr": 0.01})
        dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                       device=torch.device("cpu"), plan=plan, sharders=make_sharders())
        weights, state = _allocated(dmp)
        with open(os.path.join(out_dir, f"{optimizer}-{rank}.json"), "w") as f:
            json.dump({"weights": weights, "optimizer": state}, f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_plan_bytes_match_what_dmp_allocates(tmp_path):
    """Row-wise Adagrad only: fbgemm's fused CPU kernels have no Adam (its arithmetic is checked above)."""
    import torch.multiprocessing as mp

    optimizer = "rowwise_adagrad"
    world = 2
    cluster = Cluster(nnodes=1, nproc_per_node=world, hbm_bytes=0, ddr_bytes=8 * GIB, compute_device="cpu")
    meta_model = build_model(ModelConfig.preset("muse"), VOCAB, device="meta")
    plan = plan_embeddings(meta_model, cluster, batch_size=64, optimizer=optimizer, constraints=CONSTRAINTS)
    assert plan.error is None
    assert {s.sharding_type for s in plan.shards} == {"row_wise", "column_wise", "table_wise"}
    mp.spawn(_rank_main, args=(world, _free_port(), optimizer, plan.sharding_plan, str(tmp_path)), nprocs=world, join=True)
    for rank, expected in enumerate(plan.per_rank(world)):
        allocated = json.loads((tmp_path / f"{optimizer}-{rank}.json").read_text())
        assert allocated["weights"] == expected["weights"], rank
        assert allocated["optimizer"] == expected["optimizer"], rank
        # the planner's own estimate covers the allocation and adds only the I/O buffers of one batch
        assert expected["ddr"] >= allocated["weights"] + allocated["optimizer"]
        assert expected["ddr"] - expected["buffers"] == allocated["weights"] + allocated["optimizer"]
