"""Bad flags end in one line on stderr and exit code 2, before any work starts."""

import numpy as np
import pytest
import torch

from cli.main import main
from model.config import ModelConfig
from model.gsu import GsuStage


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["plan", "--preset", "taobao-mm-p90", "--id-dim", "0"], "--id-dim"),
        (["plan", "--preset", "taobao-mm-p90", "--hbm-gb", "nan"], "--hbm-gb"),
        (["plan", "--preset", "taobao-mm-p90", "--ddr-gb", "inf"], "--ddr-gb"),
        (["plan", "--preset", "taobao-mm-p90", "--shard", "nope=row_wise"], "nope"),
        (["plan", "--preset", "taobao-mm-p90", "--model", "nope"], "--model"),
        (["plan", "--preset", "taobao-mm-p90", "--json", "/no/such/folder/plan.json"], "--json"),
        (["bench", "gsu", "--json", "/no/such/folder/gsu.json"], "--json"),
        (["bench", "data", "--json", "/no/such/folder/data.json"], "--json"),
        (["bench", "train", "--json", "/no/such/folder/train.json"], "--json"),
        (["bench", "serve", "--json", "/no/such/folder/serve.json"], "--json"),
        (["train", "--steps", "0"], "--steps"),
    ],
)
def test_bad_flag_is_one_line_and_exit_2(argv, expected, capsys, tmp_path):
    if argv[0] == "train":
        argv = argv + ["--runs-dir", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
    assert not (tmp_path / "runs").exists()


def test_plan_takes_an_id_dim(capsys):
    assert main(["plan", "--preset", "taobao-mm-p90", "--id-dim", "32", "--nproc-per-node", "2"]) == 0
    out = capsys.readouterr().out
    assert "id_dim 32" in out and " x 32 " in out and " x 16 " not in out


def test_gsu_stage_accepts_the_prepared_numpy_memmap(tmp_path):
    table = np.zeros((5, 4), np.int8)
    table[1:] = np.arange(16, dtype=np.int8).reshape(4, 4)
    np.save(tmp_path / "mm.npy", table)
    stage = GsuStage(ModelConfig.preset("muse"), np.load(tmp_path / "mm.npy", mmap_mode="r"))
    assert stage.mm_table.table.dtype == torch.int8
    assert torch.equal(stage.mm_table.table, torch.from_numpy(table))


def test_train_refuses_a_batch_larger_than_a_rank_share_before_launching(prepared_dataset, capsys, tmp_path):
    runs = tmp_path / "runs"
    argv = ["train", "--data", str(prepared_dataset), "--batch-size", "10000000", "--runs-dir", str(runs)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 10000000" in err[0]
    assert not (runs / "torchx-logs").exists()
