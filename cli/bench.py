"""``muse bench {gsu,data,train,serve,kernels}``: benchmarks that print ratios measured in one run.

Each benchmark is ``bench/<name>.py`` with ``add_arguments(parser)`` and ``run(args) -> int``.
"""

import argparse
import importlib

BENCHMARKS = {
    "gsu": "cosine_topk vs the gather-normalize-matmul reference, with copy and gather ceilings",
    "data": "prepare rows/s and reader batches/s at L=1,000 and L=100,000",
    "train": "training samples/s on 1 and 2 CPU ranks and the fraction of step time spent waiting for data",
    "serve": "exported package: rank 1,000 candidates against a 100,000-behavior history, p50/p99 latency",
    "kernels": "serving's C kernels (dense top-K selection, eval Dice, the DIN MLP) against the torch ops they replace",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"bench.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(f"bench.{args.benchmark}").run(args)
