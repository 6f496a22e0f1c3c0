"""``muse compare --data DIR [--protocol id|paper]``: train every model of a protocol on one dataset and print one
table (model, GAUC impression-weighted and unweighted, AUC, NE, samples/s), also written as JSON and markdown.

- ``--protocol id`` (default): the ID-only baselines (din, sim_hard, sim_soft, twin), MUSE and its ablations,
  with the ``muse train`` flags as given.
- ``--protocol paper``: the released code's protocol: the ``paper_*`` presets (one model, only the GSU changes)
  trained with ``training.recipe.PAPER_RECIPE`` (batch, optimizers and learning rates, 1 epoch); the recipe's
  flags (--batch-size, --epochs, --dense-lr, --weight-decay, --embedding-optimizer, --embedding-lr) may not be given
  another value; --steps still shortens the runs.

Takes every ``muse train`` flag; ``--model`` defaults to the protocol's presets, ``--runs-dir`` to runs/compare.
Runs already complete in ``--runs-dir`` are evaluated again only if their config changed.
"""

import argparse
import json
import os
from dataclasses import fields
from typing import Optional

from cli import train as train_cli
from common.atomic import write_text_atomic
from common.errors import UserError
from model.config import ModelConfig
from training.config import TrainConfig
from training.recipe import PAPER_RECIPE, Recipe
from training.report import format_rows, run_row

PROTOCOLS = ("id", "paper")
RECIPES: dict[str, Optional[Recipe]] = {"id": None, "paper": PAPER_RECIPE}
_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def protocol_models(protocol: str) -> tuple[str, ...]:
    """The presets a protocol compares: ``paper_*`` for "paper", every other preset for "id"."""
    paper = ModelConfig.PAPER_PRESETS
    return paper if protocol == "paper" else tuple(n for n in ModelConfig.preset_names() if n not in paper)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train_cli.add_arguments(parser)
    parser.set_defaults(model=None, runs_dir=os.path.join("runs", "compare"))
    parser.add_argument("--protocol", choices=PROTOCOLS, default="id",
                        help="id: ID-only baselines, MUSE and ablations with the flags given (default); paper: the "
                             "released code's presets and training recipe")
    parser.add_argument("--out", default=None, help="prefix of the .json and .md tables (default RUNS_DIR/comparison)")


def apply_recipe(args: argparse.Namespace, recipe: Recipe, device_type: str) -> None:
    """Set the recipe's fields on ``args``; UserError naming a recipe flag the user gave (not at its default)."""
    values = recipe.train_values(device_type)
    for name, value in values.items():
        given = getattr(args, name)
        if given != _DEFAULTS[name] and given != value:
            raise UserError(f"--{name.replace('_', '-')} {given}: --protocol {recipe.name} sets it ({value})")
        setattr(args, name, value)


def run(args: argparse.Namespace) -> int:
    if args.run:
        raise UserError("--run: compare writes one run per model under --runs-dir")
    if args.model is None:
        args.model = ",".join(protocol_models(args.protocol))
    recipe = RECIPES[args.protocol]
    device_type = _device_type()
    if recipe is not None:
        apply_recipe(args, recipe, device_type)
        print(recipe.describe(device_type), flush=True)
    runs = train_cli.train_models(args, train_cli.model_names(args))
    rows = [run_row(model, run_dir) for model, run_dir in runs.items()]
    table = format_rows(rows)
    print(table)
    prefix = args.out or os.path.join(args.runs_dir, "comparison")
    summary = {"data": train_cli.resolve_data(args), "protocol": args.protocol,
               "recipe": None if recipe is None else {**recipe.__dict__, "applied": recipe.train_values(device_type)},
               "rows": rows}
    write_text_atomic(f"{prefix}.json", json.dumps(summary, indent=2), "--out", make_parent=True)
    write_text_atomic(f"{prefix}.md", format_rows(rows, tablefmt="github") + "\n", "--out", make_parent=True)
    print(f"wrote {prefix}.json and {prefix}.md")
    return 0


def _device_type() -> str:
    """Where the ranks will compute: "cuda" when this machine has a CUDA device (as ``muse train`` decides)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
