"""``muse demo``: the main job on embedded defaults, one step after another.

1. ``muse train``: synthesize + prepare a small Taobao-MM-schema dataset (cached under RUNS_DIR/data),
   train MUSE and DIN on 2 CPU ranks through torchx, evaluate both, print AUC/GAUC side by side.
2. ``muse export``: the MUSE run as a torch.package (RUNS_DIR/muse.pt), with the test split's history store beside
   it (RUNS_DIR/muse.pt.histories), so the package ranks candidates for a user id.
3. ``muse predict``: score the test split with that package (RUNS_DIR/muse-scores.parquet).
4. ``muse plan``: capacity plans for the demo data on this machine and for Taobao-MM p90 on 8 GPUs.
"""

import argparse
import os
from typing import List

from common.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", default="runs", help="where the data, runs and package go (default runs)")
    parser.add_argument("--nproc-per-node", type=int, default=2, help="training ranks (default 2)")


def _step(title: str, argv: List[str]) -> None:
    from cli.main import main

    print(f"\n=== {title}: muse {' '.join(argv)}", flush=True)
    code = main(argv)
    if code != 0:
        raise UserError(f"step '{title}' failed with exit code {code}")


def run(args: argparse.Namespace) -> int:
    runs = args.runs_dir
    muse_run, package = os.path.join(runs, "muse"), os.path.join(runs, "muse.pt")
    _step("train MUSE and DIN", ["train", "--runs-dir", runs, "--model", "muse,din", "--nproc-per-node", str(args.nproc_per_node)])
    _step("export", ["export", "--run", muse_run, "--out", package, "--histories", "test"])
    data = _run_data(muse_run)
    _step("predict", ["predict", "--package", package, "--data", data, "--out", os.path.join(runs, "muse-scores.parquet")])
    _step("plan the demo data on this machine", ["plan", "--data", data, "--nnodes", "1", "--nproc-per-node", "2",
                                                  "--compute-device", "cpu", "--hbm-gb", "0", "--ddr-gb", "16"])
    _step("plan Taobao-MM p90 on one 8-GPU host", ["plan", "--preset", "taobao-mm-p90", "--nnodes", "1", "--nproc-per-node", "8"])
    return 0


def _run_data(run_dir: str) -> str:
    from training.config import load_config

    return load_config(run_dir).data
