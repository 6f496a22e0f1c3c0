"""``muse evaluate --run RUN``: test AUC, GAUC (by user), NE and CTR of a run's newest complete checkpoint.

Outside torchrun it launches ``torchx_components/muse.py:evaluate``; under torchrun it is an
evaluation rank. The result is appended to ``RUN/metrics.jsonl`` and printed.
"""

import argparse
import os

from common.errors import UserError
from training.checkpoint import latest_checkpoint
from training.config import load_config
from training.distributed import under_launcher


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory written by muse train")
    parser.add_argument("--nnodes", type=int, default=1, help="hosts (default 1)")
    parser.add_argument("--nproc-per-node", type=int, default=2, help="ranks per host (default 2; any count loads the checkpoint)")
    parser.add_argument("--scheduler", default="local_cwd", help="torchx scheduler (default local_cwd)")


def run(args: argparse.Namespace) -> int:
    if under_launcher():
        from training.loop import evaluate_run

        evaluate_run(args.run)
        return 0
    from torchx_components import muse as components
    from training.launch import launch
    from training.report import print_runs

    config = load_config(args.run)
    if latest_checkpoint(args.run) is None:
        raise UserError(f"--run {args.run}: no complete checkpoint to evaluate")
    if args.nnodes < 1 or args.nproc_per_node < 1:
        raise UserError(f"--nnodes and --nproc-per-node must be >= 1, got {args.nnodes} and {args.nproc_per_node}")
    app = components.evaluate("--run", args.run, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node)
    if not launch(app, args.scheduler, log_dir=os.path.join(os.path.dirname(os.path.abspath(args.run)), "torchx-logs")):
        raise UserError(f"--run {args.run}: evaluation job failed (see the log above)")
    print_runs({config.model.name: args.run})
    return 0
