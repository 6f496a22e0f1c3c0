"""``muse bench data``: prepare (rows/s, peak memory, bytes written) and the reader at history lengths 1,000 and
100,000.

For each length and each size factor f: synthesize a raw dataset (not timed) holding about ``f x --entries`` history
entries with ``--samples-per-user`` samples per user, run ``prepare`` on it in a fresh process (rows/s = raw samples
per second; its peak RSS, which must not grow with f), and measure the prepared layout on disk: bytes per sample
(history store + sample shards over the train samples) and per user (store), beside what the per-sample-history
layout would hold uncompressed (each sample its user's history as int32 items and categories, plus its columns).
Then, on the f = 1 dataset, one epoch of the rank-0 reader with the history gather (world size 1): batches/s,
rows/s and history MB/s of the padded int64 windows (worker start-up and reads included), and the time to the first
batch.
"""

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from typing import Dict, List

import pyarrow.parquet as pq
from tabulate import tabulate

from capacity.layout import COPY_ROW_BYTES, measured_layout
from common.atomic import check_output_path, write_text_atomic
from common.errors import UserError
from datapipes.histories import HistoryGather
from datapipes.prepare import PrepareConfig, prepare
from datapipes.prepared import PreparedDataset
from datapipes.reader import make_dataloader
from datapipes.synth import SynthConfig, synthesize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="1000,100000", help="comma-separated history lengths (default 1000,100000)")
    parser.add_argument("--entries", type=int, default=8_000_000,
                        help="history entries per dataset at size factor 1: samples = entries / length (default 8,000,000)")
    parser.add_argument("--sizes", default="1,4", help="comma-separated size factors for prepare (default 1,4)")
    parser.add_argument("--samples-per-user", type=int, default=11,
                        help="samples per user (default 11, the Taobao-MM release's ratio)")
    parser.add_argument("--batch-entries", type=int, default=256_000,
                        help="reader batch size = batch-entries / length, at least 1 (default 256,000)")
    parser.add_argument("--num-workers", type=int, default=0, help="reader DataLoader workers (default 0)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp directory, removed)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def _prepare_child(raw: str, out: str, shard_rows: int, queue) -> None:
    start = time.perf_counter()
    prepare(PrepareConfig(raw=raw, out=out, shard_rows=shard_rows, force=True))
    queue.put((time.perf_counter() - start, _peak_rss_bytes()))


def _peak_rss_bytes() -> int:
    """This process's peak resident set since its exec (VmHWM of /proc/self/status). ``getrusage``'s ru_maxrss is
    no measure here: Linux carries the forking parent's high-water mark across fork and exec into the child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prepare_in_child(raw: str, out: str, shard_rows: int) -> tuple:
    """(seconds, peak RSS bytes) of ``prepare`` in a fresh process (so earlier runs do not count)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_prepare_child, args=(raw, out, shard_rows, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise UserError(f"prepare of {raw} failed in its benchmark process (exit {proc.exitcode})")
    return queue.get()


def _copy_layout_bytes(dataset: PreparedDataset, split: str) -> int:
    """Uncompressed bytes of the split in the per-sample-history layout: each sample its user's history (int32 item
    and category) plus its own columns."""
    store = dataset.histories(split)
    lengths = store.offsets[:, 1] - store.offsets[:, 0]
    total = 0
    for path in dataset.shards(split):
        users = pq.read_table(path, columns=["user"]).column("user").to_numpy()
        total += int(lengths[users].sum()) * 8 + users.size * COPY_ROW_BYTES
    return total


def _prepared(length: int, factor: int, args: argparse.Namespace, workdir: str) -> Dict[str, float]:
    samples = max(8, factor * args.entries // length)
    users = max(2, samples // args.samples_per_user)
    cfg = SynthConfig(users=users, items=max(1000, min(200_000, samples)), samples=samples, seq_len=length, seed=0)
    raw, out = os.path.join(workdir, f"raw-{length}-{factor}"), os.path.join(workdir, f"prepared-{length}-{factor}")
    synthesize(cfg, raw, force=True)
    seconds, peak = _prepare_in_child(raw, out, max(1, samples // 4))
    dataset = PreparedDataset.open(out)
    train = measured_layout(out, json.load(open(os.path.join(out, "metadata.json"))))["splits"]["train"]
    raw_bytes = sum(os.path.getsize(os.path.join(raw, f)) for f in os.listdir(raw))
    copy = _copy_layout_bytes(dataset, "train")
    return {"seq_len": length, "size_factor": factor, "samples": samples, "users": users, "out": out,
            "raw_bytes": raw_bytes, "prepare_s": round(seconds, 3), "prepare_rows_per_s": round(samples / seconds, 1),
            "prepare_peak_rss_mb": round(peak / 1e6, 1), "train_rows": train["samples"],
            "bytes_per_sample": round(train["bytes_per_sample"], 1),
            "history_bytes_per_user": round(train["history_bytes_per_user"], 1),
            "copy_layout_bytes_per_sample": round(copy / max(1, train["samples"]), 1),
            "copy_over_store": round(copy / max(1, train["samples"]) / max(1e-9, train["bytes_per_sample"]), 2)}


def _read(out: str, length: int, args: argparse.Namespace) -> Dict[str, float]:
    batch_size = max(1, args.batch_entries // length)
    dataset = PreparedDataset.open(out)
    loader = make_dataloader(out, "train", 0, 1, batch_size=batch_size, num_workers=args.num_workers, seed=0,
                             transform=HistoryGather(dataset.histories("train")))
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
    return {"batch_size": batch_size, "batches": batches, "reader_first_batch_s": round(first_s, 3),
            "reader_s": round(read_s, 3), "reader_batches_per_s": round(batches / read_s, 2),
            "reader_rows_per_s": round(rows / read_s, 1), "reader_history_mb_per_s": round(hist_bytes / read_s / 1e6, 1),
            "num_workers": args.num_workers}


def _ints(flag: str, text: str, low: int, high: int) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < low or max(values) > high:
        raise UserError(f"--{flag} {text!r}: each value must be in [{low}, {high}]")
    return values


def _measure(lengths: List[int], sizes: List[int], args: argparse.Namespace, workdir: str) -> List[Dict[str, float]]:
    results = []
    for length in lengths:
        for factor in sizes:
            row = _prepared(length, factor, args, workdir)
            if factor == sizes[0]:
                row.update(_read(row["out"], length, args))
            results.append({k: v for k, v in row.items() if k != "out"})
    return results


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_path(args.json, "--json")
    lengths = _ints("lengths", args.lengths, 1, 100_000)
    sizes = _ints("sizes", args.sizes, 1, 64)
    if args.samples_per_user < 1 or args.entries < 1 or args.batch_entries < 1 or args.num_workers < 0:
        raise UserError("--samples-per-user, --entries and --batch-entries must be >= 1, --num-workers >= 0")
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        results = _measure(lengths, sizes, args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="muse-bench-data-") as workdir:
            results = _measure(lengths, sizes, args, workdir)
    columns = ["seq_len", "size_factor", "samples", "prepare_s", "prepare_rows_per_s", "prepare_peak_rss_mb",
               "bytes_per_sample", "history_bytes_per_user", "copy_layout_bytes_per_sample", "copy_over_store"]
    print(tabulate([[r[c] for c in columns] for r in results], headers=columns))
    read = ["seq_len", "batch_size", "reader_first_batch_s", "batches", "reader_batches_per_s", "reader_rows_per_s",
            "reader_history_mb_per_s"]
    print(tabulate([[r[c] for c in read] for r in results if "batches" in r], headers=read))
    if args.json:
        write_text_atomic(args.json, json.dumps({"benchmark": "data", "results": results}, indent=1), flag="--json")
    return 0
