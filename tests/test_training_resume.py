"""End to end under torchrun (2 gloo ranks on CPU): a run whose rank is SIGKILLed mid-way is restarted
by torchrun, resumes from its last complete checkpoint and ends with exactly the parameters and test
metrics of an uninterrupted run; a 2-rank checkpoint loads (resharded) on 1 rank for evaluation and
for further training."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from datapipes.prepared import PreparedDataset
from model.muse import build_model
from training.checkpoint import complete_checkpoints, latest_checkpoint, load_model_weights
from training.config import load_config
from training.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

STEPS, EVERY = 40, 5  # 30 steps per epoch on the fixture data at 2 x 32: the run crosses an epoch
TRAIN_FLAGS = ["--model", "muse", "--batch-size", "32", "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
               "--keep-checkpoints", "2", "--num-workers", "1", "--log-every", "5", "--eval-batch-size", "256"]


def _env():
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MUSE_VERBOSE": "0", "PATH": bin_dir + os.pathsep + os.environ["PATH"]}


def _torchrun(nproc: int, *args: str, max_restarts: int = 0) -> subprocess.Popen:
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", str(nproc),
           "--max_restarts", str(max_restarts), "--tee", "0", "-m", "cli.main", "--", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _rank_pid(parent: int, rank: int) -> int:
    """pid of the worker process with RANK=rank among ``parent``'s children."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if env.get(b"RANK") == str(rank).encode():
            return int(entry)
    raise AssertionError(f"no rank {rank} child of {parent}")


def _weights(run_dir: str) -> dict:
    config = load_config(run_dir)
    model = build_model(config.model, PreparedDataset.open(config.data).metadata.vocab_sizes)
    load_model_weights(latest_checkpoint(run_dir).path, model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(prepared_dataset, tmp_path_factory) -> str:
    run = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    _finish(_torchrun(2, "train", "--data", prepared_dataset, "--run", run, *TRAIN_FLAGS))
    return run


def test_killed_rank_resumes_to_the_same_result(prepared_dataset, uninterrupted, tmp_path):
    run = str(tmp_path / "run")
    proc = _torchrun(2, "train", "--data", prepared_dataset, "--run", run, *TRAIN_FLAGS, max_restarts=1)
    first = os.path.join(run, "checkpoints", f"step-{EVERY:08d}", "meta.json")
    deadline = time.time() + 120
    while not os.path.exists(first):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    out = _finish(proc)
    assert "resumed from" in out, out[-3000:]
    resumed_at = int(out.split("resumed from ")[1].split("(step ")[1].split(",")[0])
    assert EVERY <= resumed_at < STEPS, "the kill must land before the end of training"

    expected, actual = _weights(uninterrupted), _weights(run)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    want, got = read_metrics(uninterrupted, "eval")[-1], read_metrics(run, "eval")[-1]
    for key in ("auc", "gauc", "ne", "ctr", "samples"):
        assert got[key] == want[key], key
    assert [c.step for c in complete_checkpoints(run)] == [STEPS - EVERY, STEPS]


def test_two_rank_checkpoint_resumes_on_one_rank(prepared_dataset, uninterrupted, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(uninterrupted, run)
    _finish(_torchrun(1, "evaluate", "--run", run))
    want, got = read_metrics(uninterrupted, "eval")[-1], read_metrics(run, "eval")[-1]
    assert got["world_size"] == 1 and want["world_size"] == 2 and got["samples"] == want["samples"]
    # Same weights, other batch shapes: logits agree to float rounding, which can flip a near-tied pair
    # (one pair moves AUC by 1/(positives x negatives) ~ 2e-5 here).
    assert got["ctr"] == want["ctr"]
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-4)
    assert got["ne"] == pytest.approx(want["ne"], abs=1e-5)
    assert got["gauc"] == pytest.approx(want["gauc"], abs=1e-4)

    shutil.rmtree(latest_checkpoint(run).path)
    out = _finish(_torchrun(1, "train", "--data", prepared_dataset, "--run", run, *TRAIN_FLAGS))
    assert f"(step {STEPS - EVERY}, written by 2 rank(s))" in out, out[-3000:]
    final = latest_checkpoint(run)
    assert final.step == STEPS and final.world_size == 1
    trained = read_metrics(run, "train")
    assert trained[-1]["step"] == STEPS and torch.isfinite(torch.tensor(trained[-1]["loss"]))


def test_checkpoint_resumes_on_one_rank_where_the_free_planner_would_replicate_tables(prepared_dataset, tmp_path):
    """At 2 x 256 the planner, left alone, makes the small profile tables data_parallel (dense AdamW)
    while at 1 rank it shards them (fused row-wise Adagrad): tests/test_sharding.py checks that premise.
    Every table must have fused optimizer state in the 2-rank checkpoint, and training resumes on 1 rank."""
    import torch.distributed.checkpoint as dcp

    from model.tables import ID_SPACES

    run = str(tmp_path / "run")
    flags = ["--model", "muse", "--batch-size", "256", "--checkpoint-every", "2", "--num-workers", "1",
             "--log-every", "1", "--eval-batch-size", "256"]
    out = _finish(_torchrun(2, "train", "--data", prepared_dataset, "--run", run, *flags, "--steps", "2"))
    assert "data_parallel" not in out.split("sharding plan")[1].split("test ")[0], out[-3000:]
    written = latest_checkpoint(run)
    assert written.step == 2 and written.world_size == 2 and written.meta["data_parallel_tables"] == []
    keys = dcp.FileSystemReader(written.path).read_metadata().state_dict_metadata
    for table in ID_SPACES:
        assert any(k.startswith("optim.state.embedding.") and f".{table}." in k and k.endswith(".momentum1") for k in keys), table

    out = _finish(_torchrun(1, "train", "--data", prepared_dataset, "--run", run, *flags, "--steps", "4"))
    assert "(step 2, written by 2 rank(s))" in out, out[-3000:]
    final = latest_checkpoint(run)
    assert final.step == 4 and final.world_size == 1
    assert [r["step"] for r in read_metrics(run, "train")][-2:] == [3, 4]
