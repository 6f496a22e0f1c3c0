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


def run(args: argparse.Namespace) -> int:
    summary = export_package(args.run, args.out, args.data)
    print(f"wrote {summary.path}: {summary.bytes:,} bytes, step {summary.step}, {summary.blobs} checksummed tensors, "
          f"{summary.items_with_attributes:,} items with known category/city/province")
    print("load it with inference.load_predictor(path), or without this project:")
    print("  importer = torch.package.PackageImporter(path); importer.import_module('inference.predictor').load(importer)")
    return 0
