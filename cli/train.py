"""``muse train``: train models of the MUSE family (SPMD on every rank of a torchx/torchrun job).

Outside torchrun it is the launcher: it finds or builds the dataset, checks the run directories,
launches ``torchx_components/muse.py:train`` once per model and prints the test AUC/GAUC side by
side. Under torchrun (as launched, or on a cluster) it is the training rank itself.
"""

import argparse
import os
from dataclasses import fields
from typing import Dict, List, Sequence

from common.errors import UserError
from datapipes.prepared import PreparedDataset
from model.config import ModelConfig
from training.config import EMBEDDING_OPTIMIZERS, RESUMABLE_FIELDS, TrainConfig, check_device_support, resolve_run_config
from training.distributed import under_launcher

DEFAULT_MODELS = ("muse", "din")
_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name not in ("data", "model")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("data and run")
    where.add_argument("--data", help="prepared dataset directory (default: a synthetic demo dataset, built once under --runs-dir)")
    where.add_argument("--model", default=",".join(DEFAULT_MODELS),
                       help=f"model preset(s), comma-separated: {', '.join(ModelConfig.preset_names())} (default: muse,din)")
    where.add_argument("--run", help="run directory (one model only; default RUNS_DIR/MODEL)")
    where.add_argument("--runs-dir", default="runs", help="parent of the default run directories and the demo dataset (default runs)")
    where.add_argument("--resume", action="store_true", help="continue the run directory's saved config even if flags differ")
    hp = parser.add_argument_group("training")
    hp.add_argument("--batch-size", type=int, default=_DEFAULTS["batch_size"], help="samples per rank per step (default %(default)s)")
    hp.add_argument("--steps", type=int, default=None, help="total training steps (default: --epochs passes)")
    hp.add_argument("--epochs", type=int, default=_DEFAULTS["epochs"], help="passes over the train split when --steps is not given (default %(default)s)")
    hp.add_argument("--max-seq-len", type=int, default=None, help="history length fed to the GSU (default: the dataset's)")
    hp.add_argument("--k", type=int, default=None, help="GSU top-k (default: the preset's, 50)")
    hp.add_argument("--id-dim", type=int, default=None, help="ID embedding width (default: the preset's, 16)")
    hp.add_argument("--dense-lr", type=float, default=_DEFAULTS["dense_lr"], help="AdamW learning rate of the dense parameters (default %(default)s)")
    hp.add_argument("--weight-decay", type=float, default=_DEFAULTS["weight_decay"], help="AdamW weight decay (default %(default)s)")
    hp.add_argument("--embedding-optimizer", choices=EMBEDDING_OPTIMIZERS, default=_DEFAULTS["embedding_optimizer"],
                    help="in-backward optimizer of the ID tables (default %(default)s)")
    hp.add_argument("--embedding-lr", type=float, default=_DEFAULTS["embedding_lr"], help="learning rate of the ID tables (default %(default)s)")
    hp.add_argument("--seed", type=int, default=_DEFAULTS["seed"], help="seed of init, data order and RNGs (default %(default)s)")
    hp.add_argument("--group-users", action=argparse.BooleanOptionalAction, default=None,
                    help="train batches keep each user's samples together, so the GSU scores each user's history once "
                         "for all of them; batches are then correlated by user (default: off)")
    hp.add_argument("--shard", action="append", default=[], metavar="TABLE=TYPE[:KERNEL]",
                    help="planner constraint for one table, e.g. item=row_wise (repeatable); unnamed tables are never data_parallel, and a table allowed data_parallel with another type may not resume at another world size")
    ops = parser.add_argument_group("operations (may change on resume)")
    ops.add_argument("--checkpoint-every", type=int, default=None, help=f"steps between checkpoints (default {_DEFAULTS['checkpoint_every']})")
    ops.add_argument("--keep-checkpoints", type=int, default=None, help=f"complete checkpoints kept (default {_DEFAULTS['keep_checkpoints']})")
    ops.add_argument("--num-workers", type=int, default=None, help=f"data workers per rank (default {_DEFAULTS['num_workers']})")
    ops.add_argument("--log-every", type=int, default=None, help=f"steps between loss records (default {_DEFAULTS['log_every']})")
    ops.add_argument("--eval-batch-size", type=int, default=None, help=f"samples per rank per evaluation batch (default {_DEFAULTS['eval_batch_size']})")
    ops.add_argument("--retrieval", default=None, metavar="auto|none|DIR",
                     help="the pipeline GSU's results: a matching stored retrieval (`muse retrieve`) under DATA/retrieval/ "
                          "when one exists, else online (auto, the default); none: always online; DIR: that retrieval "
                          "(refused unless it matches). Identical batches either way")
    job = parser.add_argument_group("job (launcher only)")
    job.add_argument("--nnodes", type=int, default=1, help="hosts (default 1)")
    job.add_argument("--nproc-per-node", type=int, default=2, help="ranks per host (default 2)")
    job.add_argument("--scheduler", default="local_cwd", help="torchx scheduler (default local_cwd)")
    job.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts after a worker dies (default 3)")


def explicit_fields(args: argparse.Namespace) -> List[str]:
    """The resumable fields given on the command line (they override a resumed run's saved values)."""
    return [name for name in RESUMABLE_FIELDS if getattr(args, name) is not None]


def model_names(args: argparse.Namespace) -> List[str]:
    names = [n.strip() for n in args.model.split(",") if n.strip()]
    unknown = [n for n in names if n not in ModelConfig.preset_names()]
    if not names or unknown:
        raise UserError(f"--model {args.model}: unknown model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(ModelConfig.preset_names())}")
    if args.run and len(names) > 1:
        raise UserError(f"--run: takes one model, got --model {args.model} (use --runs-dir for several)")
    return names


def build_config(args: argparse.Namespace, data: str, model: str) -> TrainConfig:
    """TrainConfig from the flags (UserError on a bad value)."""
    overrides = {k: v for k, v in (("k", args.k), ("id_dim", args.id_dim)) if v is not None}
    try:
        model_config = ModelConfig.preset(model, **overrides)
    except ValueError as err:
        raise UserError(f"--model {model}: {err}") from None
    values = {name: getattr(args, name) for name in _DEFAULTS if getattr(args, name, None) is not None}
    if values.get("retrieval") not in (None, "auto", "none") and "://" not in values["retrieval"]:
        values["retrieval"] = os.path.abspath(values["retrieval"])
    return TrainConfig(data=data, model=model_config, **{**values, "shard": tuple(args.shard)})


def config_args(config: TrainConfig, run: str, resume: bool, explicit: Sequence[str]) -> List[str]:
    """``muse train`` arguments that rebuild ``config`` on the ranks (resumable fields only if explicit)."""
    out = ["--data", config.data, "--run", run, "--model", config.model.name]
    if config.model.k != ModelConfig.preset(config.model.name).k:
        out += ["--k", str(config.model.k)]
    if config.model.id_dim != ModelConfig.preset(config.model.name).id_dim:
        out += ["--id-dim", str(config.model.id_dim)]
    for name in _DEFAULTS:
        value = getattr(config, name)
        if name == "shard":
            for item in value:
                out += ["--shard", item]
        elif isinstance(value, bool):
            out.append(f"--{'' if value else 'no-'}{name.replace('_', '-')}")
        elif value is not None and (name not in RESUMABLE_FIELDS or name in explicit):
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out + (["--resume"] if resume else [])


def check_split_sizes(config: TrainConfig, world_size: int) -> None:
    """Refuse, before any rank starts, a job whose ranks would find no full train batch or no test row
    (inside the ranks the same error would make torchrun restart the job)."""
    splits = PreparedDataset.open(config.data).metadata.splits
    per_rank = splits["train"].rows // world_size
    if per_rank < config.batch_size:
        raise UserError(f"--batch-size {config.batch_size}: larger than the {per_rank} train rows per rank of {config.data} "
                        f"({world_size} ranks)")
    if splits["test"].rows < world_size:
        raise UserError(f"--nproc-per-node: {world_size} ranks, but the test split of {config.data} has {splits['test'].rows} rows")


def check_retrieval(config: TrainConfig) -> None:
    """Refuse, before any rank starts, a --retrieval that does not match the dataset and model (one line)."""
    from training.data import stored_retrieval

    stored_retrieval(config, PreparedDataset.open(config.data))


def resolve_data(args: argparse.Namespace) -> str:
    """--data, checked (local paths made absolute, so the run's config holds where it is); or the demo
    dataset (built on first use)."""
    if args.data:
        PreparedDataset.open(args.data)
        return args.data if "://" in args.data else os.path.abspath(args.data)
    from training.demo_data import demo_dataset

    return os.path.abspath(demo_dataset(os.path.join(args.runs_dir, "data")))


def run(args: argparse.Namespace) -> int:
    if under_launcher():
        return _run_rank(args)
    from training.report import print_runs

    print_runs(train_models(args, model_names(args)))
    return 0


def train_models(args: argparse.Namespace, names: Sequence[str]) -> Dict[str, str]:
    """Launch one torchx training job per model (in order); returns {model: run directory}."""
    from torchx_components import muse as components
    from training.launch import launch

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps} (leave it out to train --epochs passes)")
    for flag in ("nnodes", "nproc_per_node"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    data = resolve_data(args)
    explicit = explicit_fields(args)
    planned = []
    for name in names:
        run_dir = args.run or os.path.join(args.runs_dir, name)
        config = resolve_run_config(run_dir, build_config(args, data, name), args.resume, explicit)
        check_device_support(config, _device_type())
        check_split_sizes(config, args.nnodes * args.nproc_per_node)
        check_retrieval(config)
        planned.append((name, run_dir, config))
    runs: Dict[str, str] = {}
    for name, run_dir, config in planned:
        app = components.train(*config_args(config, run_dir, args.resume, explicit), nnodes=args.nnodes,
                               nproc_per_node=args.nproc_per_node, max_restarts=args.max_restarts)
        print(f"== {name}: {run_dir} ({args.nnodes}x{args.nproc_per_node} ranks, torchx {args.scheduler})", flush=True)
        if not launch(app, args.scheduler, log_dir=os.path.join(args.runs_dir, "torchx-logs")):
            raise UserError(f"--model {name}: training job failed (see the log above)")
        runs[name] = run_dir
    return runs


def _run_rank(args: argparse.Namespace) -> int:
    from training.loop import train

    names = model_names(args)
    if len(names) != 1 or not args.run or not args.data:
        raise UserError("under torchrun, muse train needs --data, --run and one --model")
    config = build_config(args, args.data, names[0])
    check_device_support(config, _device_type())
    train(config, args.run, resume=args.resume, explicit=explicit_fields(args))
    return 0


def _device_type() -> str:
    """Where the ranks compute: "cuda" when this machine has a CUDA device (as training.distributed picks)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
