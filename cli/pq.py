"""``muse pq --data DIR --m M``: product-quantization codes of a prepared dataset's multimodal table, written
beside mm_table.npy as ``DIR/pq-m<M>/`` (see ``quantize.codes``); the ``muse_pq`` models' GSU reads them."""

import argparse
import os

from model.gsu.pq import PQSettings
from quantize.codes import write_codes

_D = PQSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared dataset directory (from muse prepare)")
    add_pq_settings(parser, required=True)
    parser.add_argument("--force", action="store_true", help="replace existing codes of this M")


def add_pq_settings(parser: argparse.ArgumentParser, required: bool) -> None:
    """The PQ training flags (shared with ``muse prepare --pq``)."""
    if required:
        parser.add_argument("--m", type=int, required=True, help="subspaces M (must divide the table width; 16: 16 B per item)")
    parser.add_argument("--centroids", type=int, default=_D.centroids, help=f"centroids per subspace (default {_D.centroids}, at most 256)")
    parser.add_argument("--sample-rows", type=int, default=_D.sample_rows,
                        help=f"non-zero table rows k-means trains on (seeded sample; default {_D.sample_rows})")
    parser.add_argument("--iterations", type=int, default=_D.iterations, help=f"k-means iterations (default {_D.iterations})")
    parser.add_argument("--pq-seed", type=int, default=_D.seed, help=f"seed of the sample and initial centroids (default {_D.seed})")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for training and encoding")


def settings_of(args: argparse.Namespace, m: int) -> PQSettings:
    return PQSettings(m=m, centroids=args.centroids, sample_rows=args.sample_rows, iterations=args.iterations, seed=args.pq_seed)


def report(summary) -> str:
    return (f"wrote {summary.path}: {summary.rows:,} items x M={summary.m} codes, {summary.code_bytes:,} B "
            f"(table {summary.table_bytes:,} B, {summary.table_bytes / summary.code_bytes:.1f}x smaller); "
            f"k-means {summary.train_s:.1f} s, encode {summary.encode_s:.1f} s, sample squared error {summary.sample_sq_error:.4f}")


def run(args: argparse.Namespace) -> int:
    print(report(write_codes(args.data, settings_of(args, args.m), force=args.force, threads=args.threads)))
    return 0
