"""``muse bench data``: prepare rows/s and reader batches/s at history lengths 1,000 and 100,000.

For each length: synthesize a small raw dataset (not timed) holding about ``--entries`` history entries
in its joined train split, time ``prepare`` on it (rows/s = raw samples per second), then time one epoch
of the rank-0 reader (world size 1) over the train split: batches/s, rows/s and history MB/s of the
padded int64 tensors over the whole epoch (worker start-up and reads included), and the time to the
first batch (start-up plus the first shuffle buffer's read).
"""

import argparse
import json
import os
import tempfile
import time
from typing import Dict, List

from tabulate import tabulate

from common.atomic import check_output_path, write_text_atomic
from common.errors import UserError
from datapipes.prepare import PrepareConfig, prepare
from datapipes.reader import make_dataloader
from datapipes.synth import SynthConfig, synthesize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="1000,100000", help="comma-separated history lengths (default 1000,100000)")
    parser.add_argument("--entries", type=int, default=8_000_000,
                        help="history entries per dataset: samples = entries / length (default 8,000,000)")
    parser.add_argument("--batch-entries", type=int, default=256_000,
                        help="reader batch size = batch-entries / length, at least 1 (default 256,000)")
    parser.add_argument("--num-workers", type=int, default=0, help="reader DataLoader workers (default 0)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp directory, removed)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def _measure(length: int, args: argparse.Namespace, workdir: str) -> Dict[str, float]:
    samples = max(8, args.entries // length)
    users = max(2, samples // 10)
    cfg = SynthConfig(users=users, items=max(1000, min(50_000, samples)), samples=samples, seq_len=length, seed=0)
    raw, out = os.path.join(workdir, f"raw-{length}"), os.path.join(workdir, f"prepared-{length}")
    synthesize(cfg, raw, force=True)
    start = time.perf_counter()
    meta = prepare(PrepareConfig(raw=raw, out=out, shard_rows=max(1, samples // 4), force=True))
    prepare_s = time.perf_counter() - start
    batch_size = max(1, args.batch_entries // length)
    loader = make_dataloader(out, "train", 0, 1, batch_size=batch_size, num_workers=args.num_workers, seed=0)
    start = time.perf_counter()
    first_s = 0.0
    batches = rows = hist_bytes = 0
    for batch in loader:
        if batches == 0:
            first_s = time.perf_counter() - start
        batches += 1
        rows += batch.batch_size
        hist_bytes += batch.history_items.numel() * 8 * 2
    read_s = time.perf_counter() - start
    return {"seq_len": length, "samples": samples, "train_rows": meta["splits"]["train"]["rows"],
            "prepare_s": round(prepare_s, 3), "prepare_rows_per_s": round(samples / prepare_s, 1),
            "batch_size": batch_size, "batches": batches, "reader_first_batch_s": round(first_s, 3),
            "reader_s": round(read_s, 3),
            "reader_batches_per_s": round(batches / read_s, 2), "reader_rows_per_s": round(rows / read_s, 1),
            "reader_history_mb_per_s": round(hist_bytes / read_s / 1e6, 1), "num_workers": args.num_workers}


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_path(args.json, "--json")
    try:
        lengths: List[int] = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lengths {args.lengths!r}: expected comma-separated integers") from None
    if not lengths or min(lengths) < 1 or max(lengths) > 100_000:
        raise UserError(f"--lengths {args.lengths!r}: each length must be in [1, 100000]")
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        results = [_measure(length, args, args.workdir) for length in lengths]
    else:
        with tempfile.TemporaryDirectory(prefix="muse-bench-data-") as workdir:
            results = [_measure(length, args, workdir) for length in lengths]
    columns = ["seq_len", "samples", "prepare_s", "prepare_rows_per_s", "batch_size", "reader_first_batch_s",
               "batches", "reader_batches_per_s", "reader_rows_per_s", "reader_history_mb_per_s"]
    print(tabulate([[r[c] for c in columns] for r in results], headers=columns))
    if args.json:
        write_text_atomic(args.json, json.dumps({"benchmark": "data", "results": results}, indent=1), flag="--json")
    return 0
