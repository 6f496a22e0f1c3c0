"""training/ pieces in one process: run-directory config rules, atomic checkpoints, TorchRec metrics
against brute force, and the CLI's answers to bad input."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist

from cli.main import main as muse_main
from common.errors import UserError
from model.config import ModelConfig
from training.checkpoint import CheckpointManager, complete_checkpoints, latest_checkpoint
from training.config import TrainConfig, load_config, resolve_run_config, save_config
from training.data import DataPosition
from training.metrics import EvalAccumulator, read_metrics, MetricsLog


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_config_round_trip_and_validation():
    config = TrainConfig(data="d", model=ModelConfig.preset("din", k=20), shard=("item=row_wise",), steps=7)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in (dict(batch_size=0), dict(dense_lr=0.0), dict(embedding_optimizer="sgd"), dict(shard=("nope=row_wise",)),
                dict(shard=("item=diagonal",)), dict(max_seq_len=0)):
        with pytest.raises(UserError):
            TrainConfig(data="d", **bad)


@pytest.mark.parametrize("group_users", [False, True])
def test_launcher_arguments_rebuild_the_config_on_the_ranks(group_users):
    """The launcher passes a config to its ranks as `muse train` flags (booleans as --flag / --no-flag)."""
    import argparse

    from cli.train import add_arguments, build_config, config_args

    config = TrainConfig(data="d", model=ModelConfig.preset("muse", k=20), shard=("item=row_wise",), steps=7,
                         batch_size=32, group_users=group_users)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(config_args(config, "runs/x", resume=False, explicit=["steps"]))
    assert build_config(args, "d", args.model) == config


def test_run_dir_with_other_config_is_refused(tmp_path):
    run = str(tmp_path / "run")
    saved = TrainConfig(data="d", dense_lr=1e-3, steps=10)
    assert resolve_run_config(run, saved, resume=False) == saved
    save_config(run, saved)
    assert load_config(run) == saved
    # Same config, other resumable fields (more steps): the run continues with them.
    longer = TrainConfig(data="d", dense_lr=1e-3, steps=20)
    assert resolve_run_config(run, longer, resume=False) == longer
    other = TrainConfig(data="d", dense_lr=5e-3, steps=20)
    with pytest.raises(UserError, match=r"different config \(dense_lr\).*--resume"):
        resolve_run_config(run, other, resume=False)
    resumed = resolve_run_config(run, other, resume=True, explicit=["steps"])
    assert resumed.dense_lr == 1e-3 and resumed.steps == 20
    assert resolve_run_config(run, other, resume=True, explicit=[]).steps == 10


def test_data_position_follows_the_step():
    assert DataPosition.at_step(25, 10) == DataPosition(2, 5)
    assert DataPosition(2, 5).rescaled(10, 20) == DataPosition(2, 10)


def _state(value: float):
    return {"model": {"w": torch.full((4, 3), value)}, "optim": {"step": torch.tensor(value)}}


def test_checkpoints_are_atomic_and_pruned(tmp_path, one_rank_group):
    run = str(tmp_path / "run")
    manager = CheckpointManager(run, keep=2, rank=0, world_size=1)
    for step in (10, 20, 30):
        manager.save(step, _state(float(step)), {"position": torch.arange(step)}, meta={"steps_per_epoch": 5})
    assert [c.step for c in complete_checkpoints(run)] == [20, 30]
    # A writer killed mid-way leaves a temp dir, or (killed between rename and meta) a dir without meta.json.
    os.makedirs(f"{run}/checkpoints/.step-00000040.tmp")
    torch.save({"junk": 1}, f"{run}/checkpoints/.step-00000040.tmp/rank-00000.pt")
    os.makedirs(f"{run}/checkpoints/step-00000050")
    latest = latest_checkpoint(run)
    assert latest.step == 30 and latest.world_size == 1 and latest.meta["steps_per_epoch"] == 5
    target = _state(0.0)
    rank_state = manager.load(latest, target)
    assert torch.equal(target["model"]["w"], torch.full((4, 3), 30.0)) and float(target["optim"]["step"]) == 30.0
    assert torch.equal(rank_state["position"], torch.arange(30))
    manager.save(60, _state(60.0), {}, meta={})
    assert not os.path.exists(f"{run}/checkpoints/.step-00000040.tmp")
    assert [c.step for c in complete_checkpoints(run)] == [30, 60]


def test_checkpoint_from_another_world_size_gives_no_rank_state(tmp_path, one_rank_group):
    run = str(tmp_path / "run")
    CheckpointManager(run, keep=1, rank=0, world_size=1).save(5, _state(5.0), {"x": torch.zeros(1)})
    meta_path = f"{run}/checkpoints/step-00000005/meta.json"
    meta = json.load(open(meta_path))
    json.dump({**meta, "world_size": 2}, open(meta_path, "w"))
    target = _state(0.0)
    assert CheckpointManager(run, keep=1, rank=0, world_size=1).load(latest_checkpoint(run), target) is None
    assert torch.equal(target["model"]["w"], torch.full((4, 3), 5.0))


def _pairwise_auc(scores, labels) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    return float(wins.mean())


def test_eval_metrics_match_brute_force(one_rank_group):
    g = torch.Generator().manual_seed(3)
    n = 600
    users = torch.randint(0, 40, (n,), generator=g)
    labels = (torch.rand(n, generator=g) < 0.35).float()
    logits = torch.randn(n, generator=g) + 1.5 * labels
    accumulator = EvalAccumulator()
    for start in range(0, n, 128):
        accumulator.add(users[start:start + 128], logits[start:start + 128], labels[start:start + 128])
    metrics = accumulator.compute()
    probs = torch.sigmoid(logits).double()
    assert metrics["auc"] == pytest.approx(_pairwise_auc(probs, labels), abs=1e-6)
    per_user = [(_pairwise_auc(probs[users == u], labels[users == u]), int((users == u).sum())) for u in users.unique()
                if 0 < labels[users == u].sum() < (users == u).sum()]
    assert metrics["gauc_unweighted"] == pytest.approx(sum(a for a, _ in per_user) / len(per_user), abs=1e-6)
    assert metrics["gauc"] == pytest.approx(sum(a * w for a, w in per_user) / sum(w for _, w in per_user), abs=1e-6)
    assert metrics["gauc_users"] == len(per_user)
    assert metrics["ctr"] == pytest.approx(float(labels.mean()), abs=1e-6)
    p = float(labels.mean())
    logloss = -(labels * probs.log() + (1 - labels) * (1 - probs).log()).mean()
    baseline = -(p * torch.log(torch.tensor(p)) + (1 - p) * torch.log(torch.tensor(1 - p)))
    assert metrics["ne"] == pytest.approx(float(logloss / baseline), rel=1e-4)


def test_metrics_log_appends_json_lines(tmp_path):
    log = MetricsLog(str(tmp_path), rank=0)
    log.write("train", 1, {"loss": 0.5})
    log.write("eval", 2, {"auc": 0.7}, model="din")
    MetricsLog(str(tmp_path), rank=1).write("train", 3, {"loss": 9.0})
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    assert read_metrics(str(tmp_path), "eval")[0]["model"] == "din"


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/no/such/dir", "--model", "din"], "/no/such/dir"),
    (["train", "--model", "nonesuch"], "--model nonesuch"),
    (["train", "--model", "muse,din", "--run", "x"], "--run"),
    (["train", "--data", "/no/such/dir", "--batch-size", "0"], "/no/such/dir"),
    (["evaluate", "--run", "/no/such/run"], "/no/such/run"),
    (["compare", "--data", "/no/such/dir"], "/no/such/dir"),
    (["compare", "--protocol", "paper", "--dense-lr", "0.01"], "--dense-lr 0.01: --protocol paper sets it"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert muse_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_refuses_a_run_dir_with_another_config(prepared_dataset, tmp_path, capsys):
    run = str(tmp_path / "run")
    save_config(run, TrainConfig(data=os.path.abspath(prepared_dataset), model=ModelConfig.preset("din"), dense_lr=1e-3))
    assert muse_main(["train", "--data", prepared_dataset, "--model", "din", "--run", run, "--dense-lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different config (dense_lr)" in err[0] and "--resume" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for CPU-only machines")
def test_cli_refuses_adam_on_cpu_before_launching(prepared_dataset, tmp_path, capsys):
    run = str(tmp_path / "run")
    argv = ["train", "--data", prepared_dataset, "--model", "din", "--run", run, "--embedding-optimizer", "adam"]
    assert muse_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--embedding-optimizer adam" in err[0] and "CPU" in err[0]
    assert not os.path.exists(run)


def test_resume_refuses_a_table_whose_optimizer_changed():
    from training.checkpoint import CheckpointInfo
    from training.loop import _check_same_optimizers

    class Plan:
        data_parallel_tables = ["profile_1"]

    same = CheckpointInfo("RUN/checkpoints/step-00000002", 2, {"world_size": 2, "data_parallel_tables": ["profile_1"]})
    _check_same_optimizers(same, Plan())
    other = CheckpointInfo("RUN/checkpoints/step-00000002", 2, {"world_size": 2, "data_parallel_tables": ["profile_2"]})
    with pytest.raises(UserError, match="profile_1, profile_2"):
        _check_same_optimizers(other, Plan())


def test_paper_recipe_is_the_released_one_with_a_cpu_stand_in_for_adam():
    from cli.compare import protocol_models
    from training.recipe import PAPER_RECIPE

    cuda = PAPER_RECIPE.train_values("cuda")
    assert cuda == {"batch_size": 1000, "epochs": 1, "dense_lr": 2e-4, "weight_decay": 0.01,
                    "embedding_optimizer": "adam", "embedding_lr": 2e-3}
    cpu = PAPER_RECIPE.train_values("cpu")
    assert cpu["embedding_optimizer"] == "rowwise_adagrad" and {k: v for k, v in cpu.items() if "embedding" not in k} == {
        k: v for k, v in cuda.items() if "embedding" not in k}
    assert "stands in for adam" in PAPER_RECIPE.describe("cpu") and "stands in" not in PAPER_RECIPE.describe("cuda")
    assert protocol_models("paper") == ModelConfig.PAPER_PRESETS
    assert "muse" in protocol_models("id") and not set(protocol_models("id")) & set(ModelConfig.PAPER_PRESETS)
