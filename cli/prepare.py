"""``muse prepare --raw DIR --out DIR``: raw Taobao-MM parquet -> vocabularies, multimodal table, shards."""

import argparse

from cli.pq import add_pq_settings, report, settings_of
from datapipes import schema
from datapipes.prepare import ON_MISSING, PrepareConfig, prepare
from quantize.codes import write_codes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PrepareConfig(raw="", out="")
    parser.add_argument("--raw", required=True, help="directory with the six Taobao-MM parquet files")
    parser.add_argument("--out", required=True, help="prepared dataset directory (must not exist unless --force)")
    parser.add_argument("--shard-rows", type=int, default=d.shard_rows, help=f"rows per output shard (default {d.shard_rows})")
    parser.add_argument("--item-coverage", type=float, default=d.item_coverage, metavar="P",
                        help="keep the most frequent history items covering this fraction of history interactions, "
                             "plus every target item (0.9 mimics the release's p90 vocabulary; default 1.0 = all)")
    parser.add_argument("--on-missing", choices=ON_MISSING, default=d.on_missing,
                        help="samples whose user has no user-features row (or whose target id is 0): drop them, or "
                             "keep them with empty history and zero profile (default drop); counted either way")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="keep only the most recent N behaviors of each history (default: keep all)")
    parser.add_argument("--buckets", type=int, default=None,
                        help="buckets samples are grouped in by user before the shuffle (default: one per ~256 MB of "
                             "decoded user features)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the within-bucket sample shuffle (default 0)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--pq", type=int, default=None, metavar="M",
                        help="also write PQ codes of M subspaces beside mm_table.npy (OUT/pq-mM, as `muse pq`)")
    add_pq_settings(parser, required=False)


def run(args: argparse.Namespace) -> int:
    if args.pq is not None:  # checked before the data is prepared (the table is always MM_DIM wide)
        settings_of(args, args.pq).check(schema.MM_DIM)
    cfg = PrepareConfig(raw=args.raw, out=args.out, shard_rows=args.shard_rows, item_coverage=args.item_coverage,
                        on_missing=args.on_missing, max_seq_len=args.max_seq_len, buckets=args.buckets,
                        seed=args.seed, force=args.force)
    meta = prepare(cfg)
    sizes = ", ".join(f"{k} {v}" for k, v in meta["vocab_sizes"].items())
    print(f"wrote {args.out}: train {meta['splits']['train']['rows']} rows in {len(meta['splits']['train']['shards'])} shards, "
          f"test {meta['splits']['test']['rows']} rows in {len(meta['splits']['test']['shards'])} shards, "
          f"max_seq_len {meta['max_seq_len']}")
    print(f"vocabularies: {sizes}")
    for split in ("train", "test"):
        js, info = meta["join_stats"][split], meta["splits"][split]
        print(f"{split}: {js['sample_rows']} samples, {js['rows_written']} written, missing user "
              f"{js['missing_user_dropped']} dropped / {js['missing_user_padded']} padded, unknown target "
              f"{js['unknown_target_dropped']} dropped / {js['unknown_target_padded']} padded, targets without SCL "
              f"{js['targets_without_scl']}; history store {info['histories']}: {info['users_with_history']} users, "
              f"{info['history_entries']} behaviors ({js['history_unknown_items_kept']} out-of-vocabulary items kept "
              f"in place with their category)")
    items = meta["join_stats"]["items"]
    print(f"multimodal table: {items['vocab_items_without_scl']} vocabulary items without an SCL row (zero rows)")
    if args.pq is not None:
        print(report(write_codes(args.out, settings_of(args, args.pq), force=True, threads=args.threads)))
    return 0
