"""``muse``: one console script, subcommands loaded lazily so ``muse --help`` stays fast.

Each subcommand lives in ``cli/<name>.py`` and defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

import argparse
import importlib
import sys
from typing import Optional, Sequence

from common.errors import UserError
from common import quiet

# name -> one-line help. The module cli/<name>.py implements it.
SUBCOMMANDS = {
    "demo": "the main job on embedded defaults: synth, prepare, train MUSE and DIN, export, plan",
    "synth": "write synthetic data in the Taobao-MM raw schema",
    "pretrain": "learn the frozen 128-d multimodal table from raw content vectors (I2I or SCL contrastive)",
    "prepare": "raw Taobao-MM parquet -> vocabularies, multimodal table, joined shards",
    "pq": "product-quantization codes of a prepared dataset's multimodal table (the muse_pq GSU)",
    "retrieve": "run a model's GSU once over a dataset and store its results for training",
    "train": "train a model (launches ranks through torchx unless already under torchrun)",
    "evaluate": "evaluate a run's newest checkpoint on the test split",
    "compare": "train every baseline and ablation on one dataset and print one table",
    "export": "write a torch.package inference model from a run",
    "predict": "score a prepared dataset with an exported package",
    "serve": "serve an exported package over HTTP: rank, prefetch, health, metrics",
    "plan": "embedding capacity plan for a cluster and a data scale",
    "bench": "benchmarks: gsu, data, train, serve",
}


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``muse CMD: error: ...``) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _load(name: str):
    return importlib.import_module(f"cli.{name.replace('-', '_')}")


def build_parser(load_all: bool = False) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="muse", description="MUSE lifelong user-interest CTR modeling on TorchRec")
    parser.add_argument("-v", "--verbose", action="store_true", help="show third-party logs and warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=not load_all)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    # Parse only the global flags and the command name; the subcommand parses the rest.
    known, _ = top.parse_known_args([a for a in argv if a in ("-v", "--verbose")] + [a for a in argv if not a.startswith("-")][:1])
    if known.command is None:
        top.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    quiet.configure(known.verbose)
    name = known.command
    rest = argv[argv.index(name) + 1:]
    module = _load(name)
    parser = OneLineParser(prog=f"muse {name}", description=SUBCOMMANDS[name])
    parser.add_argument("-v", "--verbose", action="store_true", help="show third-party logs and warnings")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    if args.verbose:
        quiet.configure(True)
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"muse {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"muse {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
