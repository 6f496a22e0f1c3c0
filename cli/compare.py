"""``muse compare --data DIR [--protocol id|paper]``: train every model of a protocol on one dataset and print one
table (model, GAUC impression-weighted and unweighted, AUC, NE, samples/s), also written as JSON and markdown.

- ``--protocol id`` (default): the ID-only baselines (din, sim_hard, sim_soft, twin), MUSE and its ablations,
  with the ``muse train`` flags as given.
- ``--pq``: also MUSE on the approximate PQ GSU (``muse_pq`` / ``paper_muse_pq``: 16-byte codes, the best 200 by
  estimate re-scored exactly), its codes written beside the table first when missing (as ``muse pq --m 16``),
  and its GAUC delta against the exact MUSE printed and stored (``pq_vs_exact``).
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
from quantize.codes import ensure_codes
from training.report import format_deltas, format_rows, pq_deltas, run_row

PROTOCOLS = ("id", "paper")
RECIPES: dict[str, Optional[Recipe]] = {"id": None, "paper": PAPER_RECIPE}
_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def protocol_models(protocol: str) -> tuple[str, ...]:
    """The presets a protocol compares: ``paper_*`` for "paper", every other preset for "id" (the approximate-GSU
    presets only with ``--pq``, ``with_pq_models``)."""
    paper = ModelConfig.PAPER_PRESETS
    if protocol == "paper":
        return paper
    return tuple(n for n in ModelConfig.preset_names() if n not in paper and n not in ModelConfig.PQ_PRESETS)


def with_pq_models(models: list[str]) -> list[str]:
    """``models`` plus the approximate-GSU preset of each exact one that has one (``ModelConfig.PQ_PRESETS``)."""
    return models + [pq for pq, exact in ModelConfig.PQ_PRESETS.items() if exact in models and pq not in models]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train_cli.add_arguments(parser)
    parser.set_defaults(model=None, runs_dir=os.path.join("runs", "compare"))
    parser.add_argument("--protocol", choices=PROTOCOLS, default="id",
                        help="id: ID-only baselines, MUSE and ablations with the flags given (default); paper: the "
                             "released code's presets and training recipe")
    parser.add_argument("--out", default=None, help="prefix of the .json and .md tables (default RUNS_DIR/comparison)")
    parser.add_argument("--pq", action="store_true",
                        help="also train MUSE on the approximate PQ GSU (codes written beside the table when missing) "
                             "and report its GAUC delta against the exact MUSE")


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
    if args.pq:
        models = with_pq_models(args.model.split(","))
        if not any(n in ModelConfig.PQ_PRESETS for n in models):
            raise UserError(f"--pq: none of --model {args.model} has a PQ variant (those of {', '.join(ModelConfig.PQ_PRESETS.values())})")
        args.model = ",".join(models)
        data = train_cli.resolve_data(args)
        args.data = data
        for m in sorted({ModelConfig.preset(n).pq_m for n in models if n in ModelConfig.PQ_PRESETS}):
            written = ensure_codes(data, m)
            if written is not None:
                print(f"wrote {written.path}: PQ codes, M = {m}", flush=True)
    recipe = RECIPES[args.protocol]
    device_type = _device_type()
    if recipe is not None:
        apply_recipe(args, recipe, device_type)
        print(recipe.describe(device_type), flush=True)
    runs = train_cli.train_models(args, train_cli.model_names(args))
    rows = [run_row(model, run_dir) for model, run_dir in runs.items()]
    table = format_rows(rows)
    print(table)
    deltas = pq_deltas(rows, ModelConfig.PQ_PRESETS)
    if deltas:
        print(format_deltas(deltas))
    prefix = args.out or os.path.join(args.runs_dir, "comparison")
    summary = {"data": train_cli.resolve_data(args), "protocol": args.protocol,
               "recipe": None if recipe is None else {**recipe.__dict__, "applied": recipe.train_values(device_type)},
               "rows": rows, "pq_vs_exact": deltas}
    write_text_atomic(f"{prefix}.json", json.dumps(summary, indent=2), "--out", make_parent=True)
    write_text_atomic(f"{prefix}.md", format_rows(rows, tablefmt="github") + "\n", "--out", make_parent=True)
    print(f"wrote {prefix}.json and {prefix}.md")
    return 0


def _device_type() -> str:
    """Where the ranks will compute: "cuda" when this machine has a CUDA device (as ``muse train`` decides)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
