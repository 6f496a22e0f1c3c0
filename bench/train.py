"""``muse bench train``: MUSE training samples/s on 1 and 2 CPU ranks, and the fraction of step time
the trainer waits for data (the GSU runs in the data workers, ahead of the step).

Shapes: the Taobao-MM one (batch 1000 per rank, L = 1,000, K = 50, ID dim 16) on two datasets, a small
table (10,000 items, 64 categories: 1.3 MB of int8 content rows, cache-resident) and a large one
(``--large-items``, default 300,000 synthetic items, and ``--large-categories``, default 1,000; ``--skip-large``
leaves it out). ``muse prepare`` keeps the items that occur (133,131 of the 300,000 at L = 1,000: a 17 MB content
table; 258,888 at L = 100,000: 33 MB), so the rows and MB of the prepared content table are printed per run;
tables of that size compete with everything else for a 32 MB L3 but no longer sit in L2,
and L = 100,000 with a smaller batch on the large table, the latter with the GSU online over the history store (shuffled, and with batches grouped by user:
``muse train --group-users``, so the GSU scores each history once for all of a user's samples) and from a stored
retrieval (``muse retrieve`` once, then batches without any history scoring). Each point is one real ``muse train`` job launched through torchx on a synthetic dataset
of that history length (built once, cached under --runs-dir). Throughput and data wait are measured
between the first and the last loss record, so start-up, the pipeline's fill and evaluation are left out.
"""

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
from tabulate import tabulate

from common.atomic import check_output_path, write_text_atomic
from common.errors import UserError
from datapipes.prepare import PrepareConfig, prepare
from datapipes.prepared import PreparedDataset
from datapipes.synth import SynthConfig, synthesize
from training.metrics import read_metrics


@dataclass(frozen=True)
class Shape:
    seq_len: int
    batch_size: int
    steps: int
    synth: SynthConfig
    shard_rows: int
    name: str = ""  # dataset label in the results ("small" / "large" table at L = 1,000, "long" at L = 100,000)
    group_users: bool = False
    stored: bool = False  # batches from a stored retrieval (`muse retrieve`, made once) instead of the online GSU


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    parser.add_argument("--batch-size", type=int, default=1000, help="batch per rank at L=1,000 (default 1000)")
    parser.add_argument("--steps", type=int, default=25, help="steps per run at L=1,000 (default 25)")
    parser.add_argument("--long-batch-size", type=int, default=16, help="batch per rank at L=100,000 (default 16)")
    parser.add_argument("--long-steps", type=int, default=30, help="steps per run at L=100,000 (default 30)")
    parser.add_argument("--skip-long", action="store_true", help="only the L=1,000 shape")
    parser.add_argument("--skip-large", action="store_true", help="leave out the large-table L=1,000 dataset")
    parser.add_argument("--skip-small", action="store_true", help="leave out the small-table L=1,000 dataset")
    parser.add_argument("--large-items", type=int, default=300_000,
                        help="synthetic items of the large-table datasets (default 300,000; the prepared table keeps those "
                             "that occur)")
    parser.add_argument("--large-categories", type=int, default=1000,
                        help="categories of the large-table dataset (default 1,000)")
    parser.add_argument("--num-workers", type=int, default=1, help="data workers per rank (default 1)")
    parser.add_argument("--threads-per-rank", type=int, default=0,
                        help="intra-op threads per rank (default: cores // (ranks x (1 + workers)), at least 1: "
                             "the data workers get cores too, and oversubscribed OpenMP threads spin)")
    parser.add_argument("--runs-dir", default=os.path.join("runs", "bench"), help="datasets and runs (default runs/bench)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def _shapes(args: argparse.Namespace) -> List[Shape]:
    shapes = []
    if not args.skip_small:
        shapes.append(Shape(1000, args.batch_size, args.steps,
                            SynthConfig(users=2000, items=10000, samples=40000, seq_len=1000, seed=0), 4000, name="small"))
    if not args.skip_large:
        large = SynthConfig(users=2000, items=args.large_items, samples=40000, seq_len=1000,
                            categories=args.large_categories, seed=0)
        shapes.append(Shape(1000, args.batch_size, args.steps, large, 4000, name="large"))
    if not args.skip_long:
        # 1,280 samples (10 per user): an epoch (72 batches of 16 on one rank) outlasts the measured steps, as on
        # real data, where epoch boundaries are rare; only the stream's steady state is measured.
        # Its table is the large one (--large-items / --large-categories), so the online GSU's gathers miss the
        # caches as on real data.
        long_data = SynthConfig(users=128, items=args.large_items, samples=1280, seq_len=100_000,
                                categories=args.large_categories, seed=0)
        shapes.append(Shape(100_000, args.long_batch_size, args.long_steps, long_data, 64, name="long"))
        shapes.append(Shape(100_000, args.long_batch_size, args.long_steps, long_data, 64, group_users=True, name="long"))
        shapes.append(Shape(100_000, args.long_batch_size, args.long_steps, long_data, 64, stored=True, name="long"))
    return shapes


def _dataset(shape: Shape, runs_dir: str) -> str:
    root = os.path.join(runs_dir, f"data-L{shape.seq_len}-{shape.synth.samples}" + _large_suffix(shape))
    prepared = os.path.join(root, "prepared")
    if not os.path.exists(os.path.join(prepared, "metadata.json")):
        print(f"building the L={shape.seq_len} dataset in {root} (once) ...", flush=True)
        synthesize(shape.synth, os.path.join(root, "raw"), force=True)
        prepare(PrepareConfig(raw=os.path.join(root, "raw"), out=prepared, shard_rows=shape.shard_rows, force=True))
    return prepared


def _large_suffix(shape: Shape) -> str:
    """Names the large-table datasets and their runs apart (the small one keeps its historical names)."""
    return f"-items{shape.synth.items}-cats{shape.synth.categories}" if shape.name in ("large", "long") else ""


def _table_label(shape: Shape) -> str:
    return f"{shape.synth.items:,} items / {shape.synth.categories:,} cats"


def _content_table(data: str) -> Dict[str, float]:
    """Rows and MB of the prepared dataset's multimodal table (the rows the GSU gathers from)."""
    table = np.load(os.path.join(data, "mm_table.npy"), mmap_mode="r")
    return {"mm_rows": int(table.shape[0]), "mm_mb": round(table.nbytes / 1e6, 1)}


def _stored_retrieval(data: str) -> None:
    """The MUSE retrieval of ``data`` (made once, where ``muse train --retrieval auto`` finds it)."""
    from model.config import ModelConfig
    from retrieval.run import RetrieveConfig, retrieve
    from retrieval.store import RetrievalSpec, default_location

    model = ModelConfig.preset("muse")
    dataset = PreparedDataset.open(data)
    if not os.path.exists(default_location(data, RetrievalSpec.of(model, None, dataset))):
        print(f"retrieving {data} with the MUSE GSU (once) ...", flush=True)
        retrieve(RetrieveConfig(data=data, model=model, num_workers=min(2, os.cpu_count() or 1)))


def _steady_state(run_dir: str, global_batch: int) -> Dict[str, float]:
    """samples/s and data-wait fraction between the first and the last loss record."""
    records = read_metrics(run_dir, "train")
    if len(records) < 2:
        raise UserError(f"{run_dir}: fewer than two loss records; raise --steps")
    first, last = records[0], records[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    return {
        "samples_per_s": global_batch * (last["step"] - first["step"]) / seconds,
        "data_wait_fraction": (last["data_wait_s"] - first["data_wait_s"]) / seconds,
        "step_ms": 1000 * seconds / (last["step"] - first["step"]),
    }


def _threads(args: argparse.Namespace, world: int) -> int:
    return args.threads_per_rank or max(1, (os.cpu_count() or 1) // (world * (1 + args.num_workers)))


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_path(args.json, "--json")
    from torchx_components import muse as components
    from training.launch import launch

    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--ranks {args.ranks}: expected comma-separated integers") from None
    if not ranks or min(ranks) < 1:
        raise UserError(f"--ranks {args.ranks}: rank counts must be >= 1")
    for flag, minimum in (("batch_size", 1), ("steps", 2), ("long_batch_size", 1), ("long_steps", 2), ("num_workers", 0),
                          ("threads_per_rank", 0), ("large_items", 100_000), ("large_categories", 1000)):
        if getattr(args, flag) < minimum:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {minimum}, got {getattr(args, flag)}")
    shapes = _shapes(args)
    if not shapes:
        raise UserError("--skip-small --skip-large --skip-long: nothing left to run")
    results = []
    for shape in shapes:
        data = _dataset(shape, args.runs_dir)
        if shape.stored:
            _stored_retrieval(data)
        for world in ranks:
            run_dir = os.path.join(args.runs_dir, f"muse-L{shape.seq_len}-{world}r" + ("-by-user" if shape.group_users else "")
                                   + ("-stored" if shape.stored else "") + _large_suffix(shape))
            shutil.rmtree(run_dir, ignore_errors=True)
            log_every = max(1, shape.steps // 5)
            app = components.train(
                "--data", data, "--run", run_dir, "--model", "muse", "--batch-size", str(shape.batch_size),
                "--steps", str(shape.steps), "--log-every", str(log_every), "--checkpoint-every", "0",
                "--num-workers", str(args.num_workers), "--eval-batch-size", str(shape.batch_size),
                *(["--group-users"] if shape.group_users else []), "--retrieval", "auto" if shape.stored else "none",
                nproc_per_node=world, cpu=world * _threads(args, world), max_restarts=0,
            )
            print(f"== MUSE L={shape.seq_len} batch {shape.batch_size}/rank on {world} rank(s), {_table_label(shape)}"
                  + (", batches grouped by user" if shape.group_users else "")
                  + (", stored retrieval" if shape.stored else ", GSU online over the history store"), flush=True)
            if not launch(app, "local_cwd", log_dir=os.path.join(args.runs_dir, "torchx-logs")):
                raise UserError(f"bench run {run_dir} failed (see the log above)")
            results.append({"seq_len": shape.seq_len, "batch_per_rank": shape.batch_size, "ranks": world,
                            "items": shape.synth.items, "categories": shape.synth.categories, **_content_table(data),
                            "batches": "by user" if shape.group_users else "shuffled",
                            "gsu": "stored retrieval" if shape.stored else "online",
                            "threads_per_rank": _threads(args, world), "k": 50,
                            "id_dim": 16, **_steady_state(run_dir, shape.batch_size * world)})
    print(tabulate([(r["seq_len"], f"{r['items']:,} / {r['categories']:,}", f"{r['mm_rows']:,} ({r['mm_mb']} MB)",
                     r["batch_per_rank"], r["batches"], r["gsu"],
                     r["ranks"], f"{r['samples_per_s']:.0f}",
                     f"{r['samples_per_s'] / r['batch_per_rank'] / r['ranks']:.1f}", f"{r['step_ms']:.0f}",
                     f"{100 * r['data_wait_fraction']:.1f}%") for r in results],
                   headers=("L", "items / cats", "content rows", "batch/rank", "batches", "GSU", "ranks", "samples/s", "steps/s", "step ms",
                            "waiting for data")))
    if args.json:
        write_text_atomic(args.json, json.dumps({"benchmark": "train", "results": results}, indent=2), flag="--json")
        print(f"wrote {args.json}")
    return 0
