"""``muse bench kernels``: serving's C kernels against the torch ops they replace, in one process, one thread.

- ``dense top-K``: ``cosine_topk`` of ``--candidates`` targets against one history broadcast to all of them (what
  ``muse serve`` runs) on an int8 table of ``--items`` + 1 rows (default 1,000,001: the rows are read from memory,
  not cache), three ways (``MUSE_GSU_KERNEL=dense=...``): the dots as int32 sums and each target's selection in one
  C call (``native``), float32 ``torch.mm`` with the selection in C (``float32``, ``model.gsu.dense_select``), and
  ``torch.mm`` with the selection in torch ops; histories of each ``--lengths`` behaviors drawn with Zipf popularity
  as ``muse bench serve`` draws them. Results must be identical.
- ``ESU by index``: ``Esu.blocks_shared`` (serving's ESU: ``--candidates`` candidates, K = 50 slots into ~900 distinct
  behaviors, the recent SimTier too) with the attention pass and SimTier's counts in C (``model.esu_native``) vs in
  torch ops, for the default ``muse`` preset and ``paper_muse`` (SA-TA with projections); largest difference printed.
- ``Dice``: eval Dice without autograd over [``--pairs``, 80] activations (the C kernel, ``model.dice_native``, vs
  torch's four passes); largest absolute difference printed.
- ``DIN kernel``: ``DinAttention.forward_shared`` of ``--candidates`` queries over the same 50 keys with the MLP in
  one C call (``model.din_native``) vs in torch blocks of ~4K pairs (``_SharedBlock``); largest difference printed.
- ``DIN``: the same against the jagged forward (the keys repeated per query), as serving ran before either.
- ``tower``: the MUSE preset's over arch on ``--candidates`` rows of one user, its first Linear folded over the
  input's column blocks (``model.columns.folded_linear``: the user's id and profile once, each SimTier as [C, 20]
  weights) vs on the concatenated [C, 544] input; largest logit difference printed.
- ``vocabulary``: ``--candidates`` raw-id lookups in a vocabulary of ``--items`` keys with the bucket index vs the
  binary search (``inference.predictor.VocabTable``), a 64 MB buffer written between two lookups so each starts
  with the caches as a rank leaves them. Results must be identical.

Each method is timed ``--repeats`` times in turns (so a burst of load slows all alike) and the best kept; the CPU
capability torch dispatches on, the kernels that loaded and the load average are printed with the ratios.
"""

import argparse
import contextlib
import json
import os
import time
from typing import Callable, Dict, Iterator, List

import numpy as np
import torch
from tabulate import tabulate

from bench.serve_package import OwnPackageConfig, content_table, histories, raw_ids
from common.atomic import check_output_path, write_text_atomic
from common.errors import UserError
from datapipes.batch import SPARSE_FEATURES
from inference.predictor import VocabTable
from model import dice_native, din_native, esu_native
from model.attention import DinAttention
from model.config import ModelConfig
from model.columns import Dense, Shared, Tiers, concatenated
from model.esu import Esu
from model.muse import OverArch
from model.gsu import cbuild, dense_select, kernels
from model.gsu.topk import cosine_topk
from model.tower import Dice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=1_000_000, help="table rows - 1 (default 1,000,000)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 100_000],
                        help="history lengths of the dense top-K (default 1000 100000)")
    parser.add_argument("--candidates", type=int, default=1000, help="targets / DIN queries (default 1000)")
    parser.add_argument("--pairs", type=int, default=50_000, help="rows of the Dice activations (default 50,000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each method, best kept (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def _best_in_turns(methods: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Best ms of each method over ``repeats`` rounds, the methods run in turns (one warm-up round first)."""
    best = {name: float("inf") for name in methods}
    for round_ in range(repeats + 1):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            if round_:
                best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


@contextlib.contextmanager
def _without(module, prefix: str) -> Iterator[None]:
    """``module.LIBRARY`` swapped for one that never loads (the torch fallback runs) for the duration."""
    saved, module.LIBRARY = module.LIBRARY, cbuild.Library.absent(f"{prefix}: torch ops forced")
    try:
        yield
    finally:
        module.LIBRARY = saved


@contextlib.contextmanager
def _forced(setting: str) -> Iterator[None]:
    """MUSE_GSU_KERNEL set to ``setting`` for the duration (the kernel choice follows it at once)."""
    saved = os.environ.get(kernels.ENV_VAR)
    os.environ[kernels.ENV_VAR] = setting
    try:
        yield
    finally:
        if saved is None:
            del os.environ[kernels.ENV_VAR]
        else:
            os.environ[kernels.ENV_VAR] = saved


def _dense_rows(args: argparse.Namespace) -> List[Dict[str, object]]:
    rng = np.random.default_rng(args.seed)
    cfg = OwnPackageConfig(items=args.items, users=1, history=max(args.lengths), seed=args.seed)
    table = content_table(rng, cfg, rng.integers(0, cfg.clusters, size=cfg.items + 1))
    targets = torch.from_numpy(rng.integers(1, args.items + 1, size=args.candidates))
    rows = []
    for length in args.lengths:
        history = torch.from_numpy(histories(rng, OwnPackageConfig(items=args.items, users=1, history=length))[0])
        shared = history[None, :].expand(args.candidates, -1)

        def run_with(setting: str, native_select: bool = True, shared=shared):
            with _forced(setting):
                if native_select:
                    return cosine_topk(table, targets, shared, 50)
                with _without(dense_select, "dense_select"):
                    return cosine_topk(table, targets, shared, 50)

        methods = {"dots in C": lambda: run_with("dense=native"), "float32 mm": lambda: run_with("dense=float32"),
                   "torch": lambda: run_with("dense=float32", native_select=False)}
        results = [fn() for fn in methods.values()]
        identical = all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))
        times = _best_in_turns(methods, args.repeats)
        case = f"{args.candidates} x L={length:,} ({int(torch.unique(history).numel()):,} distinct items)"
        check = f"identical: {'yes' if identical else 'NO'}"
        rows.append({"kernel": "dense top-K: int32 dots + selection in C vs float32 mm + C selection", "case": case,
                     "native_ms": times["dots in C"], "torch_ms": times["float32 mm"], "check": check})
        rows.append({"kernel": "dense top-K: float32 mm + C selection vs torch ops", "case": case,
                     "native_ms": times["float32 mm"], "torch_ms": times["torch"], "check": check})
    return rows


def _dice_row(args: argparse.Namespace) -> Dict[str, object]:
    torch.manual_seed(args.seed)
    dice = Dice(80).eval()
    dice.norm.running_var.uniform_(0.5, 2.0)
    dice.norm.running_mean.uniform_(-1, 1)
    dice.alpha.data.uniform_(-0.5, 0.5)
    x = torch.randn(args.pairs, 80)
    def fallback():
        with _without(dice_native, "dice"):
            return dice(x)

    with torch.inference_mode():  # as serving's ranks run them (kernels keep prepared weights there)
        diff = float((dice(x) - fallback()).abs().max())
        times = _best_in_turns({"native": lambda: dice(x), "torch": fallback}, args.repeats)
    return {"kernel": "Dice (eval)", "case": f"[{args.pairs:,}, 80]", "native_ms": times["native"],
            "torch_ms": times["torch"], "check": f"max |diff| {diff:.1e}"}


def _esu_rows(args: argparse.Namespace) -> List[Dict[str, object]]:
    """``Esu.blocks_shared`` (joined) of ``--candidates`` candidates over K = 50 slots into U distinct selected behaviors
    (serving's ESU), with the attention pass and SimTier's counts in C (``model.esu_native``) and in torch ops,
    for the default MUSE (SA-TA without projections) and the paper preset (SA-TA with projections). U is the size
    serving meets (a 1,000-behavior history's selection), not a table: the rows are the user's, in cache by design."""
    rows = []
    for preset in ("muse", "paper_muse"):
        torch.manual_seed(args.seed)
        cfg = ModelConfig.preset(preset)
        esu = Esu(cfg).eval()
        c, k, u, e = args.candidates, cfg.k, min(900, 18 * cfg.k), 2 * cfg.id_dim
        query, distinct = torch.randn(c, e), torch.randn(u, e)
        index = torch.randint(0, u, (c, k))
        index[:, -3:] = -1
        similarity, recent = torch.rand(c, k) * 2 - 1, torch.rand(c, cfg.recent_len) * 2 - 1
        recent_mask = torch.ones(c, cfg.recent_len, dtype=torch.bool)

        def native():
            return concatenated(esu.blocks_shared(query, distinct, index, similarity, recent, recent_mask),
                                query.shape[0])

        def fallback():
            with _without(esu_native, "esu"):
                return native()

        with torch.inference_mode():  # as serving's ranks run them (kernels keep prepared weights there)
            diff = float((native() - fallback()).abs().max())
            times = _best_in_turns({"native": native, "torch": fallback}, args.repeats)
        rows.append({"kernel": f"ESU by index ({preset}: {cfg.esu}{', projections' if cfg.attention_projections else ''})",
                     "case": f"{c:,} candidates x K={k} over {u} behaviors", "native_ms": times["native"],
                     "torch_ms": times["torch"], "check": f"max |diff| {diff:.1e}"})
    return rows


def _din_kernel_row(args: argparse.Namespace) -> Dict[str, object]:
    torch.manual_seed(args.seed)
    din = DinAttention(32, (80, 40), "dice").eval()
    query, keys = torch.randn(args.candidates, 32), torch.randn(50, 32)

    def blocks():
        with _without(din_native, "din"):
            return din.forward_shared(query, keys)

    with torch.inference_mode():  # as serving's ranks run them (kernels keep prepared weights there)
        native = lambda: din.forward_shared(query, keys)  # noqa: E731
        times = _best_in_turns({"native": native, "torch": blocks}, args.repeats)
        diff = float((native() - blocks()).abs().max())
    return {"kernel": "DIN MLP (C) vs torch blocks", "case": f"{args.candidates:,} queries x 50 keys",
            "native_ms": times["native"], "torch_ms": times["torch"], "check": f"max |diff| {diff:.1e}"}


def _din_row(args: argparse.Namespace) -> Dict[str, object]:
    torch.manual_seed(args.seed)
    din = DinAttention(32, (80, 40), "dice").eval()
    query, keys = torch.randn(args.candidates, 32), torch.randn(50, 32)
    lengths = torch.full((args.candidates,), 50)
    offsets = torch.arange(args.candidates + 1) * 50
    repeated = keys.repeat(args.candidates, 1)
    with torch.inference_mode():  # as serving's ranks run them (kernels keep prepared weights there)
        jagged = lambda: din(query, repeated, lengths, offsets, 50)  # noqa: E731
        shared = lambda: din.forward_shared(query, keys)  # noqa: E731
        times = _best_in_turns({"shared": shared, "jagged": jagged}, args.repeats)
        diff = float((shared() - jagged()).abs().max())
    return {"kernel": "DIN, shared keys", "case": f"{args.candidates:,} queries x 50 keys", "native_ms": times["shared"],
            "torch_ms": times["jagged"], "check": f"max |diff| {diff:.1e}"}


def _tower_row(args: argparse.Namespace) -> Dict[str, object]:
    """The MUSE preset's over arch on ``--candidates`` rows of one user: folded first Linear vs concatenated input."""
    torch.manual_seed(args.seed)
    cfg = ModelConfig.preset("muse")
    dim, rows = cfg.id_dim, args.candidates
    sparse = {name: Dense(torch.randn(rows, dim)) if name.startswith("item_") else Shared(torch.randn(dim))
              for name in SPARSE_FEATURES}
    tiers = [Tiers(torch.log1p(torch.randint(0, 20, (rows, cfg.num_tiers)).float()), torch.randn(cfg.num_tiers,
                                                                                                 cfg.tier_dim))
             for _ in range(2)]
    interest = [Dense(torch.randn(rows, 2 * dim)) for _ in range(3)] + tiers
    over = OverArch(len(SPARSE_FEATURES) * dim + sum(b.width for b in interest), cfg).eval()
    blocks = [sparse[name] for name in SPARSE_FEATURES] + interest
    with torch.inference_mode():  # as serving's ranks run it
        folded = lambda: over.forward_blocks(sparse, interest, rows)  # noqa: E731
        plain = lambda: over.logit(over.mlp(concatenated(blocks, rows))).squeeze(-1)  # noqa: E731
        times = _best_in_turns({"folded": folded, "plain": plain}, args.repeats)
        diff = float((folded() - plain()).abs().max())
    width = sum(b.width for b in blocks)
    return {"kernel": "tower: first Linear folded vs concatenated", "case": f"{rows:,} x {width} input, one user",
            "native_ms": times["folded"], "torch_ms": times["plain"], "check": f"max |diff| {diff:.1e}"}


def _vocab_row(args: argparse.Namespace) -> Dict[str, object]:
    """``--candidates`` lookups in a vocabulary of ``--items`` raw ids, bucket index vs binary search, each lookup
    after a 64 MB write (the caches as a rank leaves them), in turns, best of ``--repeats``."""
    rng = np.random.default_rng(args.seed)
    ids = raw_ids(rng, args.items)
    order = np.argsort(ids, kind="stable")
    keys, index = torch.from_numpy(ids[order].copy()), torch.from_numpy(order.astype(np.int64) + 1)
    tables = {"buckets": VocabTable(keys, index, buckets=True), "search": VocabTable(keys, index, buckets=False)}
    wanted = torch.from_numpy(np.concatenate([ids[rng.integers(0, args.items, args.candidates - args.candidates // 10)],
                                              rng.integers(1, 2 ** 62, args.candidates // 10)]))
    flush = np.zeros(64 << 17, dtype=np.int64)  # 64 MB, more than the last-level cache
    best = {name: float("inf") for name in tables}
    for round_ in range(args.repeats + 1):
        for name, table in tables.items():
            flush += 1
            start = time.perf_counter()
            table.lookup(wanted)
            if round_:
                best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    same = torch.equal(tables["buckets"].lookup(wanted), tables["search"].lookup(wanted))
    return {"kernel": "vocabulary: bucket index vs binary search",
            "case": f"{args.candidates:,} ids, {args.items:,} keys, caches flushed",
            "native_ms": best["buckets"], "torch_ms": best["search"], "check": f"identical: {'yes' if same else 'NO'}"}


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--items", args.items), ("--candidates", args.candidates), ("--pairs", args.pairs),
                        ("--repeats", args.repeats), ("--lengths", min(args.lengths))):
        if value < 1:
            raise UserError(f"{flag}: must be >= 1 (got {value})")
    if args.json:
        check_output_path(args.json, "--json")
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    loaded = {"dense_select": dense_select.LIBRARY.reason() or "native", "esu": esu_native.LIBRARY.reason() or "native",
              "dice": dice_native.LIBRARY.reason() or "native", "din": din_native.LIBRARY.reason() or "native"}
    rows = _dense_rows(args) + _esu_rows(args) + [_dice_row(args), _din_kernel_row(args), _din_row(args),
                                                 _tower_row(args), _vocab_row(args)]
    for row in rows:
        row["ratio"] = row["torch_ms"] / row["native_ms"]
    capability = str(torch.backends.cpu.get_cpu_capability())
    print(f"cpu capability {capability}, 1 torch thread, table {args.items + 1:,} x 128 int8, kernels: {loaded}, "
          f"load average {' '.join(f'{v:.2f}' for v in load_before)} -> {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(tabulate([[r["kernel"], r["case"], f"{r['native_ms']:.2f}", f"{r['torch_ms']:.2f}", f"{r['ratio']:.2f}x",
                     r["check"]] for r in rows],
                   headers=["kernel", "case", "new ms", "torch ms", "torch / new", "check"]))
    print("(DIN: 'new' is forward_shared (the C MLP), 'torch' the jagged forward over the repeated keys; both run the Dice "
          "kernel. tower and vocabulary: 'new' the folded Linear / the bucket index, 'torch' the concatenated input / "
          "the binary search)")
    if args.json:
        payload = {"cpu_capability": capability, "threads": 1, "kernels": loaded, "load_before": load_before,
                   "load_after": os.getloadavg(), "args": vars(args), "rows": rows}
        write_text_atomic(args.json, json.dumps(payload, indent=2, default=str), flag="--json")
    return 0
