"""``muse predict``: score a prepared dataset's split with an exported package, to a parquet file.

Rows are read in the split's stored order and mapped back to raw hashed ids before scoring, so any
prepared dataset works (its vocabulary need not be the one the package was exported with). Output
columns: ``row`` (position in the split), ``user_id``, ``item_id`` (raw hashed ids), ``label``, ``score``
(click probability). The file is written atomically.
"""

import argparse

from inference.predict import predict_split


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--package", required=True, metavar="PATH", help="package written by `muse export`")
    parser.add_argument("--data", required=True, metavar="DIR", help="prepared dataset directory")
    parser.add_argument("--out", required=True, metavar="PATH", help="parquet file to write, e.g. scores.parquet")
    parser.add_argument("--split", default="test", help="split to score (default test)")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per scoring batch (default 1024)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="history length (default: the length the model was trained with)")


def run(args: argparse.Namespace) -> int:
    summary = predict_split(args.package, args.data, args.out, args.split, args.batch_size, args.max_seq_len)
    print(f"wrote {summary.path}: {summary.rows:,} rows, mean score {summary.mean_score:.4f}, "
          f"click rate {summary.click_rate:.4f}")
    return 0
