"""``muse retrieve --data DIR [--model muse]``: run a model's pipeline GSU once over the dataset and store, per
sample, what the ESU reads (the selected behaviors' ids and cosines, the recent window's cosines).

``muse train`` then builds its batches from the stored results (identical batches, no history scoring in the
data workers). Outside torchrun, ``--nproc-per-node`` / ``--nnodes`` above 1 launch
``torchx_components/muse.py:retrieve``: each rank retrieves a disjoint, contiguous range of every split.
"""

import argparse
import os

from common.errors import UserError
from model.config import ModelConfig
from retrieval.run import RetrieveConfig, retrieve
from training.distributed import under_launcher


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--model", default="muse", help="preset whose pipeline GSU runs (muse, sim_hard, ablations on the "
                                                         "multimodal GSU; default muse)")
    parser.add_argument("--k", type=int, default=None, help="GSU top-k (default: the preset's, 50)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="history length searched (default: whole histories)")
    parser.add_argument("--splits", default="train,test", help="comma-separated splits (default train,test)")
    parser.add_argument("--out", default=None, help="retrieval directory (default DATA/retrieval/<gsu>-k<K>-s<S>-l<L>, "
                                                    "where muse train finds it)")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per GSU call (default 256)")
    parser.add_argument("--num-workers", type=int, default=1, help="data workers per rank running the GSU (default 1)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    job = parser.add_argument_group("job")
    job.add_argument("--nnodes", type=int, default=1, help="hosts (default 1: this process)")
    job.add_argument("--nproc-per-node", type=int, default=1, help="ranks per host (default 1: this process)")
    job.add_argument("--scheduler", default="local_cwd", help="torchx scheduler when launching ranks (default local_cwd)")


def _config(args: argparse.Namespace) -> RetrieveConfig:
    try:
        model = ModelConfig.preset(args.model, **({"k": args.k} if args.k is not None else {}))
    except ValueError as err:
        raise UserError(f"--model {args.model}: {err}") from None
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    if not splits or len(set(splits)) != len(splits):
        raise UserError(f"--splits {args.splits}: give each split once, e.g. train,test")
    out = args.out if args.out is None or "://" in args.out else os.path.abspath(args.out)
    data = args.data if "://" in args.data else os.path.abspath(args.data)
    return RetrieveConfig(data=data, model=model, max_seq_len=args.max_seq_len, splits=splits, out=out,
                          batch_size=args.batch_size, num_workers=args.num_workers, force=args.force)


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    for flag in ("nnodes", "nproc_per_node"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not under_launcher() and args.nnodes * args.nproc_per_node > 1:
        return _launch(args, cfg)
    out, meta = retrieve(cfg)
    if meta:
        rows = ", ".join(f"{split} {info['rows']} samples" for split, info in meta["splits"].items())
        print(f"wrote {out}: {meta['spec']['gsu']} GSU, k {meta['spec']['k']}, L {meta['spec']['max_seq_len']}: {rows}")
    return 0


def _launch(args: argparse.Namespace, cfg: RetrieveConfig) -> int:
    from torchx_components import muse as components
    from training.launch import launch

    forwarded = ["--data", cfg.data, "--model", args.model, "--splits", ",".join(cfg.splits),
                 "--batch-size", str(cfg.batch_size), "--num-workers", str(cfg.num_workers)]
    for flag, value in (("--k", args.k), ("--max-seq-len", cfg.max_seq_len), ("--out", cfg.out)):
        if value is not None:
            forwarded += [flag, str(value)]
    forwarded += ["--force"] if cfg.force else []
    app = components.retrieve(*forwarded, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node)
    if not launch(app, args.scheduler, log_dir=os.path.join("runs", "torchx-logs")):
        raise UserError(f"--nproc-per-node {args.nproc_per_node}: the retrieval job failed (see the log above)")
    return 0
