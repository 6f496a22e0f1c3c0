"""``muse compare --data DIR``: train every baseline and ablation on one dataset and print one table
(model, GAUC, AUC, NE, samples/s), also written as JSON and markdown.

Takes every ``muse train`` flag; ``--model`` defaults to all presets, ``--runs-dir`` to runs/compare.
Runs already complete in ``--runs-dir`` are evaluated again only if their config changed.
"""

import argparse
import json
import os

from cli import train as train_cli
from common.atomic import write_text_atomic
from common.errors import UserError
from model.config import ModelConfig
from training.report import format_rows, run_row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train_cli.add_arguments(parser)
    parser.set_defaults(model=",".join(ModelConfig.preset_names()), runs_dir=os.path.join("runs", "compare"))
    parser.add_argument("--out", default=None, help="prefix of the .json and .md tables (default RUNS_DIR/comparison)")


def run(args: argparse.Namespace) -> int:
    if args.run:
        raise UserError("--run: compare writes one run per model under --runs-dir")
    runs = train_cli.train_models(args, train_cli.model_names(args))
    rows = [run_row(model, run_dir) for model, run_dir in runs.items()]
    table = format_rows(rows)
    print(table)
    prefix = args.out or os.path.join(args.runs_dir, "comparison")
    write_text_atomic(f"{prefix}.json", json.dumps({"data": train_cli.resolve_data(args), "rows": rows}, indent=2), "--out", make_parent=True)
    write_text_atomic(f"{prefix}.md", format_rows(rows, tablefmt="github") + "\n", "--out", make_parent=True)
    print(f"wrote {prefix}.json and {prefix}.md")
    return 0

