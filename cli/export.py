"""``muse export``: write a run's newest complete checkpoint as a self-contained torch.package.

The package runs code when loaded: share it only with, and load it only from, trusted parties.
"""

import argparse

from inference.export import export_package


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="training run directory (config.json, checkpoints/)")
    parser.add_argument("--out", required=True, metavar="PATH", help="package file to write, e.g. model.pt (written atomically)")
    parser.add_argument("--data", metavar="DIR", help="prepared dataset to take vocabularies and the multimodal table from "
                        "(default: the run's own --data)")
    parser.add_argument("--histories", metavar="SPLIT", default=None,
                        help="also copy that split's per-user history store beside the package (OUT.histories), so it "
                             "ranks candidates for a user id (Predictor.rank_user; default: no copy)")


def run(args: argparse.Namespace) -> int:
    summary = export_package(args.run, args.out, args.data, args.histories)
    print(f"wrote {summary.path}: {summary.bytes:,} bytes, step {summary.step}, {summary.blobs} checksummed tensors, "
          f"{summary.items_with_attributes:,} items with known category/city/province")
    if args.histories:
        print(f"wrote {summary.path}.histories: the {args.histories} split's history store (users served by id)")
    print("load it with inference.load_predictor(path), or without this project:")
    print("  importer = torch.package.PackageImporter(path); importer.import_module('inference.predictor').load(importer)")
    return 0
