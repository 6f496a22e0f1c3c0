"""``muse synth --out DIR``: synthetic data in the Taobao-MM raw schema (six parquet files), plus the items'
raw content vectors (``raw_content.parquet``, input of ``muse pretrain``) unless ``--raw-content-dim 0``."""

import argparse

from common.errors import UserError
from datapipes.synth import RAW_CONTENT, RawContentConfig, SynthConfig, synthesize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--users", type=int, default=d.users, help=f"number of users (default {d.users})")
    parser.add_argument("--items", type=int, default=d.items, help=f"number of items (default {d.items})")
    parser.add_argument("--samples", type=int, default=d.samples, help=f"train + test samples (default {d.samples})")
    parser.add_argument("--seq-len", type=int, default=d.seq_len,
                        help=f"behavior sequence length, up to 100000 (default {d.seq_len})")
    parser.add_argument("--categories", type=int, default=d.categories, help=f"number of categories (default {d.categories})")
    parser.add_argument("--clusters", type=int, default=d.clusters,
                        help=f"latent semantic item clusters (default {d.clusters})")
    parser.add_argument("--test-fraction", type=float, default=d.test_fraction,
                        help=f"fraction of samples in the test split (default {d.test_fraction})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed; output is deterministic per seed (default {d.seed})")
    parser.add_argument("--raw-content-dim", type=int, default=RawContentConfig().dim, metavar="D",
                        help=f"also write {RAW_CONTENT}: raw content vectors of D dimensions per item, a noisy view of "
                             f"the items' semantics for muse pretrain; 0 = do not write it (default {RawContentConfig().dim})")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    cfg = SynthConfig(users=args.users, items=args.items, samples=args.samples, seq_len=args.seq_len,
                      categories=args.categories, clusters=args.clusters, test_fraction=args.test_fraction, seed=args.seed)
    if args.raw_content_dim < 0:
        raise UserError(f"--raw-content-dim: must be at least 0, got {args.raw_content_dim}")
    content = RawContentConfig(dim=args.raw_content_dim) if args.raw_content_dim else None
    counts = synthesize(cfg, args.out, force=args.force, raw_content=content)
    print(f"wrote {args.out}: " + ", ".join(f"{name} {rows} rows" for name, rows in counts.items()))
    return 0
