"""``muse synth --out DIR``: synthetic data in the Taobao-MM raw schema (six parquet files)."""

import argparse

from datapipes.synth import SynthConfig, synthesize


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
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    cfg = SynthConfig(users=args.users, items=args.items, samples=args.samples, seq_len=args.seq_len,
                      categories=args.categories, clusters=args.clusters, test_fraction=args.test_fraction, seed=args.seed)
    counts = synthesize(cfg, args.out, force=args.force)
    print(f"wrote {args.out}: " + ", ".join(f"{name} {rows} rows" for name, rows in counts.items()))
    return 0
