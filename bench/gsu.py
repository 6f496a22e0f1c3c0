"""``muse bench gsu``: the project's ``cosine_topk`` against the straightforward reference GSU, in one process on
the same inputs, with two ceilings measured in the same run.

For each table dtype (int8 as released, bfloat16) a random table of ``--table-gb`` (rows of D = 128, much
larger than the CPU caches) is built, and for each history length L a batch whose gathered rows hold
``--history-gb`` (B = history bytes / (L * row bytes)). Timed, best of ``--repeats`` (interleaved):

- ``reference``: gather the rows, convert to float, normalise, batched matmul, top-k (the released code's way);
- ``cosine_topk``: model/gsu/__init__.py (for bf16, prefiltering on the table's int8 shadow unless ``--no-int8-filter``);
- ``index_select``: a bare gather of the same rows into a reused, pre-written buffer, as many rows at a time as
  ``cosine_topk`` gathers at once (``gather_rows_for``: an L2-sized block), the real limit for random row gathers;
- ``copy``: memcpy bandwidth between two pre-written buffers (so untouched pages do not inflate it).

Everything runs with ``--threads`` torch threads (default 1, as in a DataLoader worker, where the GSU runs;
on a loaded machine, multi-threaded small ops also stall on descheduled threads). Plus a shared-user case:
every user has ``--samples-per-user`` samples (one history row, different targets, shuffled through the
batch), as in Taobao-MM; there the bare gather reads each distinct history once.

Kernels: the int8 products inside ``cosine_topk`` (the filter's rows x targets, the exact dots) run the kernel
``model.gsu.kernels`` measured fastest in this process (or the one ``MUSE_GSU_KERNEL`` forces); which ran, the
CPU capability and every candidate's time on the selection probe are printed and written to the JSON.
``--compare-kernels`` also times ``cosine_topk`` with each other exact kernel forced, as methods
``cosine_topk[filter=int_mm]`` etc. (results must be bit-identical to ``cosine_topk``'s, and are checked).

With ``--pq M`` (``bench.gsu_pq``): the approximate GSU ``pq_topk`` on the table's M-subspace PQ codes (built once
before timing, with every CPU), as methods ``pq`` (estimates only) and ``pq+rescoreK'`` (the best K' of each ``--pq-candidates``
re-scored exactly), each with its recall@K against ``cosine_topk``'s top-K, bytes its scan reads and the bytes of
the table it scans, beside ``cosine_topk``'s, and the PQ scan that ran (``pq_scan=native|torch``, measured like the
int8 kernels; ``--compare-pq-scans`` also times every pq method with the other scan forced, results checked
identical). ``--table-kind clustered`` (content like ``muse synth``'s) or
``--table-from DATA`` (a prepared dataset's table) give PQ the structure real content has; a random table has none.

Printed: ms per batch, behaviors/s (B * L / time), peak extra resident memory (``VmHWM`` after a reset,
Linux), ratios vs the reference and vs the bare gather, whether both GSUs selected the same behaviors
(top-k scores within 1e-5), and the system load average before and after (the CPUs may be shared).
"""

import argparse
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from common.atomic import check_output_path, write_text_atomic
from common.errors import UserError
from bench import gsu_pq
from model.gsu import PQIndex, chunk_rows_for, cosine_topk, gather_rows_for, kernels, pq_topk
from model.gsu.shadow import FilterShadow, filter_shadow
from model.gsu.table import INT8_SCALE, RowNorms, row_norms

_GB = 1 << 30
_COPY_BYTES = 256 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 10000, 100000], help="history lengths L")
    parser.add_argument("--dtypes", nargs="+", default=["int8", "bfloat16"], choices=["int8", "bfloat16", "float32"])
    parser.add_argument("--k", type=int, default=50, help="top-k")
    parser.add_argument("--dim", type=int, default=128, help="multimodal embedding width D")
    parser.add_argument("--table-gb", type=float, default=2.0, help="size of each table (default 2 GB)")
    parser.add_argument("--history-gb", type=float, default=0.2,
                        help="bytes of table rows one batch gathers (B = this / (L * row bytes)); default 0.2 GB")
    parser.add_argument("--samples-per-user", type=int, default=11, help="shared-user case: samples per history row")
    parser.add_argument("--shared-lengths", type=int, nargs="*", default=None,
                        help="lengths for the shared-user case (default: the largest of --lengths)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method (best is reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the GSU runs in DataLoader workers, one thread each)")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="history positions cosine_topk filters per step (default: its DEFAULT_CHUNK_ROWS)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run (0.25 GB tables, L <= 10,000)")
    parser.add_argument("--int8-filter", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16/float32 tables: cosine_topk prefilters on the table's int8 shadow (default on; "
                             "built once per table, before timing, as MMTable does)")
    parser.add_argument("--compare-kernels", action="store_true",
                        help="also time cosine_topk with every other exact int8 kernel forced (MUSE_GSU_KERNEL), "
                             "and check that its results are bit-identical")
    parser.add_argument("--pq", type=int, default=None, metavar="M",
                        help="also time the approximate PQ GSU on M-subspace codes (recall@K against cosine_topk)")
    parser.add_argument("--pq-candidates", type=int, nargs="+", default=[200, 1000, 5000],
                        help="K' values re-scored exactly, one method pq+rescoreK' each where K' < L (default 200 1000 5000)")
    parser.add_argument("--compare-pq-scans", action="store_true",
                        help="with --pq: also time every pq method with each other PQ scan forced (e.g. pq_scan=torch)")
    parser.add_argument("--pq-sample-rows", type=int, default=65536, help="table rows k-means trains on (default 65536)")
    parser.add_argument("--table-kind", choices=gsu_pq.TABLE_KINDS, default="random",
                        help="random: uniform int8 rows (no structure; default); clustered: content like muse synth's")
    parser.add_argument("--clusters", type=int, default=None,
                        help=f"clustered table: clusters (default one per {gsu_pq.ROWS_PER_CLUSTER} rows)")
    parser.add_argument("--table-from", default=None, metavar="DATA",
                        help="use this prepared dataset's mm_table.npy instead of a generated table (--table-gb unused)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


@dataclass
class Row:
    """One timed case. rate = behaviors per second (B * L / seconds)."""

    dtype: str
    length: int
    batch: int
    samples_per_user: int
    method: str
    ms_per_batch: float
    behaviors_per_s: float
    peak_extra_mb: Optional[float]
    vs_reference: Optional[float] = None
    vs_index_select: Optional[float] = None
    agrees: Optional[bool] = None
    kernels: Optional[str] = None  # the kernels that ran, as MUSE_GSU_KERNEL names them (pq rows: the PQ scan)
    recall_at_k: Optional[float] = None  # pq rows: share of cosine_topk's top-K positions also selected
    vs_cosine_topk: Optional[float] = None  # cosine_topk's time / this method's
    bytes_read: Optional[int] = None  # cosine_topk and pq rows: bytes the scan reads per batch (from the shapes)
    table_bytes: Optional[int] = None  # bytes of the table the scan reads (pq: codes + codebooks)


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_path(args.json, "--json")
    _check_args(args)
    kernels.check_override()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.table_gb, args.history_gb = min(args.table_gb, 0.25), min(args.history_gb, 0.02)
        args.lengths = [length for length in args.lengths if length <= 10000] or [1000]
    shared_lengths = args.shared_lengths if args.shared_lengths is not None else [max(args.lengths)]
    generator = torch.Generator().manual_seed(args.seed)
    load_before = _load_average()
    copy_gbps = _copy_bandwidth(args.repeats)
    print(f"threads {torch.get_num_threads()}, copy bandwidth (pre-written buffers): {copy_gbps:.2f} GB/s, "
          f"load average {load_before}")
    chosen = _kernel_choices(args.dim)
    print(f"int8 kernels (cpu capability {chosen[0].cpu_capability}; times on the selection probe):")
    for choice in chosen:
        print(f"  {choice.describe()}")
    rows: List[Row] = []
    for name in args.dtypes:
        table, norms = _table(args, name, generator)
        clusters = args.clusters or max(1, table.shape[0] // gsu_pq.ROWS_PER_CLUSTER)
        index = None
        if args.pq is not None:
            index, seconds = gsu_pq.build_index(table, args.pq, args.pq_sample_rows, args.seed)
            print(f"PQ index: M = {index.m}, {index.codebooks.shape[1]} centroids, {index.nbytes / _GB:.3f} GB "
                  f"(table {table.numel() * table.element_size() / _GB:.3f} GB), built in {seconds:.1f} s")
            scan_choice = kernels.choose(kernels.PQ_SCAN, index.m)
            print(f"  {scan_choice.describe()}")
            chosen = chosen + [scan_choice] if scan_choice not in chosen else chosen
        row_bytes = table.element_size() * args.dim
        print(f"\n{name} table: {table.shape[0]:,} x {args.dim} ({table.numel() * table.element_size() / _GB:.2f} GB), "
              f"copy ceiling {copy_gbps * 1e9 / row_bytes / 1e6:.1f} M rows/s")
        shadow = None
        if table.dtype != torch.int8 and args.int8_filter:
            start = time.perf_counter()
            shadow = filter_shadow(table, norms.sq_norm)
            print(f"int8 filter shadow: {shadow.rows.numel() / _GB:.2f} GB, built in {time.perf_counter() - start:.1f} s")
        cases = [(length, 1) for length in args.lengths] + [(length, args.samples_per_user) for length in shared_lengths]
        for length, per_user in cases:
            if args.k > length:
                raise UserError(f"--k {args.k}: larger than --lengths {length}")
            batch = max(per_user, int(args.history_gb * _GB // (length * row_bytes)) // per_user * per_user)
            if args.table_kind == "clustered" and args.table_from is None:
                targets, history, distinct = gsu_pq.clustered_batch(table.shape[0], clusters, batch, length, per_user, generator)
            else:
                targets, history, distinct = _random_batch(table.shape[0], batch, length, per_user, generator)
            case = _compare(args, name, table, norms, shadow, targets, history, distinct, per_user, index)
            rows += case
            _print(case)
        del table, norms, shadow, index
    load_after = _load_average()
    _print_summary(rows, copy_gbps)
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}, on {os.cpu_count()} CPUs")
    if args.json:
        payload = {"copy_gbps": copy_gbps, "threads": torch.get_num_threads(), "args": vars(args),
                   "load_average_before": load_before, "load_average_after": load_after,
                   "cpus": os.cpu_count(), "cpu_capability": chosen[0].cpu_capability,
                   "kernels": [c.to_dict() for c in chosen], "results": [asdict(r) for r in rows]}
        write_text_atomic(args.json, json.dumps(payload, indent=2), flag="--json")
    return 0


def _kernel_choices(width: int) -> List[kernels.Choice]:
    """The kernels cosine_topk runs at ``width`` in this process (measured now if not yet): filter, wide filter, dots."""
    return [kernels.choose(kernels.FILTER, width), kernels.choose(kernels.FILTER_WIDE, width), kernels.choose(kernels.DOTS, width)]


def _kernel_setting(chosen: List[kernels.Choice]) -> str:
    return ",".join(f"{c.op}={c.name}" for c in chosen)


def _alternatives(width: int) -> List[str]:
    """MUSE_GSU_KERNEL settings that force each exact kernel other than the chosen one (one product at a time)."""
    out = []
    for choice in _kernel_choices(width):
        out += [f"{choice.op}={name}" for name in choice.times_ms if name != choice.name]
    return out


class _Forced:
    """Context: MUSE_GSU_KERNEL set to ``setting`` (restored after)."""

    def __init__(self, setting: str):
        self.setting, self.saved = setting, None

    def __enter__(self) -> None:
        self.saved = os.environ.get(kernels.ENV_VAR)
        os.environ[kernels.ENV_VAR] = self.setting

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            os.environ.pop(kernels.ENV_VAR, None)
        else:
            os.environ[kernels.ENV_VAR] = self.saved


def _pq_scan_alternatives(m: int) -> List[str]:
    """MUSE_GSU_KERNEL settings that force each PQ scan other than the chosen one."""
    choice = kernels.choose(kernels.PQ_SCAN, m)
    return [f"{choice.op}={name}" for name in choice.times_ms if name != choice.name]


def _pq_method(index: PQIndex, table: torch.Tensor, norms: RowNorms, targets: torch.Tensor, history: torch.Tensor,
               k: int, candidates: int, chunk: int, setting: str) -> Callable[[], object]:
    """A call of ``pq_topk`` with ``candidates`` re-scored (0: none), under the MUSE_GSU_KERNEL ``setting`` ("" =
    the measured choice)."""
    def call() -> object:
        with _Forced(setting) if setting else contextlib.nullcontext():
            return pq_topk(index, table, targets, history, k, candidates, norms=norms, chunk_rows=chunk)
    return call


def _check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--k", args.k), ("--dim", args.dim), ("--repeats", args.repeats),
                        ("--samples-per-user", args.samples_per_user), ("--chunk-rows", args.chunk_rows or 1)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if args.table_gb <= 0 or args.history_gb <= 0:
        raise UserError("--table-gb/--history-gb: must be positive")
    if any(length < 1 for length in args.lengths):
        raise UserError(f"--lengths {args.lengths}: must be positive")
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1")
    if args.pq is not None:
        if args.pq < 1 or args.dim % args.pq:
            raise UserError(f"--pq {args.pq}: must be a positive divisor of --dim {args.dim}")
        if min(args.pq_candidates) < args.k or args.pq_sample_rows < 1:
            raise UserError(f"--pq-candidates {args.pq_candidates}: each must be >= --k {args.k} (and --pq-sample-rows >= 1)")
    if args.clusters is not None and args.clusters < 1:
        raise UserError(f"--clusters {args.clusters}: must be at least 1")
    if args.table_from is not None and not os.path.isdir(args.table_from):
        raise UserError(f"--table-from {args.table_from}: not a prepared dataset directory")


def _table(args: argparse.Namespace, name: str, generator: torch.Generator) -> Tuple[torch.Tensor, RowNorms]:
    """The table of one dtype: --table-from's, a clustered one or a random one of --table-gb."""
    if args.table_from is not None:
        return gsu_pq.table_from(args.table_from, name)
    if args.table_kind == "clustered":
        rows = max(2, int(args.table_gb * _GB) // (args.dim * torch.empty((), dtype=getattr(torch, name)).element_size()))
        clusters = args.clusters or max(1, rows // gsu_pq.ROWS_PER_CLUSTER)
        return gsu_pq.clustered_table(name, rows, args.dim, clusters, generator)
    return _random_table(name, args.table_gb, args.dim, generator)


def _random_table(name: str, gb: float, dim: int, generator: torch.Generator) -> Tuple[torch.Tensor, RowNorms]:
    """A random table as ``prepare`` would write it (int8, row 0 zeros), converted as MMTable.load would."""
    dtype = {"int8": torch.int8, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    n = max(2, int(gb * _GB) // (dim * torch.empty((), dtype=dtype).element_size()))
    table = torch.empty(n, dim, dtype=dtype)
    step = 1 << 18
    for start in range(0, n, step):
        chunk = torch.randint(-127, 128, (min(step, n - start), dim), dtype=torch.int8, generator=generator)
        table[start:start + chunk.shape[0]] = chunk if dtype == torch.int8 else (chunk.float() / INT8_SCALE).to(dtype)
    table[0] = 0
    return table, row_norms(table)


def _random_batch(n: int, batch: int, length: int, per_user: int,
                  generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets [B], history [B, L], distinct histories [U, L]): uniform random item ids in [1, n), so every
    gather misses the caches; ``per_user`` samples (shuffled through the batch) share each history row."""
    users = torch.randint(1, n, (batch // per_user, length), generator=generator)
    order = torch.randperm(batch, generator=generator) if per_user > 1 else torch.arange(batch)
    history = users.repeat_interleave(per_user, dim=0)[order]
    return torch.randint(1, n, (batch,), generator=generator), history, users


def reference_topk(table: torch.Tensor, target_ids: torch.Tensor, history_ids: torch.Tensor,
                   k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The straightforward GSU: gather [B, L, D], to float, normalise, batched matmul, top-k. (scores, positions)."""
    batch, length = history_ids.shape
    scale = 1.0 / INT8_SCALE if table.dtype == torch.int8 else 1.0
    rows = table.index_select(0, history_ids.reshape(-1)).view(batch, length, -1).float() * scale
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    target = table.index_select(0, target_ids).float() * scale
    target = target / target.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = torch.bmm(rows, target[:, :, None]).squeeze(-1).masked_fill(history_ids == 0, float("-inf"))
    return torch.topk(scores, k, dim=1)


def _compare(args: argparse.Namespace, name: str, table: torch.Tensor, norms: RowNorms,
             shadow: Optional[FilterShadow], targets: torch.Tensor, history: torch.Tensor, distinct: torch.Tensor,
             per_user: int, index: Optional[PQIndex] = None) -> List[Row]:
    """Time the three methods on one batch. The bare gather reads each distinct history once (the floor of
    any exact GSU that shares them; with one sample per user, every row of the batch), always of the table's
    own rows (with the int8 shadow, ``cosine_topk``'s filter reads half the bytes of a bf16 row)."""
    batch, length = history.shape
    chunk = chunk_rows_for(table, args.chunk_rows)
    step = gather_rows_for(table, chunk)
    buffer = torch.zeros(step, table.shape[1], dtype=table.dtype)
    flat = distinct.reshape(-1)

    def gather() -> None:
        for start in range(0, flat.shape[0], step):
            ids = flat[start:start + step]
            torch.index_select(table, 0, ids, out=buffer[: ids.shape[0]])

    def ours() -> object:
        return cosine_topk(table, targets, history, args.k, norms=norms, chunk_rows=chunk, shadow=shadow,
                           int8_filter=shadow is not None)

    def forced(setting: str) -> Callable[[], object]:
        def call() -> object:
            with _Forced(setting):
                return ours()
        return call

    methods: Dict[str, Callable[[], object]] = {"reference": lambda: reference_topk(table, targets, history, args.k),
                                                "cosine_topk": ours, "index_select": gather}
    if args.compare_kernels:
        methods.update({f"cosine_topk[{setting}]": forced(setting) for setting in _alternatives(table.shape[1])})
    rescore: Dict[str, int] = {}
    if index is not None:
        pq_methods = {"pq": 0}
        pq_methods.update({f"pq+rescore{c}": c for c in sorted(set(args.pq_candidates)) if c < length})  # K' >= L: exact
        scans = [""] + (_pq_scan_alternatives(index.m) if args.compare_pq_scans else [])
        for setting in scans:
            for label, candidates in pq_methods.items():
                m = f"{label}[{setting}]" if setting else label
                rescore[m] = candidates
                methods[m] = _pq_method(index, table, norms, targets, history, args.k, candidates, chunk, setting)
    best = {m: float("inf") for m in methods}
    peaks: Dict[str, Optional[float]] = {}
    outputs: Dict[str, object] = {}
    for m, fn in methods.items():  # first (untimed) run of each: warm-up and peak memory
        outputs[m], peaks[m] = _peak_extra_mb(fn)
    for _ in range(args.repeats):
        for m, fn in methods.items():
            start = time.perf_counter()
            fn()
            best[m] = min(best[m], time.perf_counter() - start)
    ref_scores = outputs["reference"][0]
    ours_scores = outputs["cosine_topk"][0]
    agrees = bool(torch.allclose(ours_scores, ref_scores, atol=1e-5, rtol=0))
    ran = _kernel_setting(_kernel_choices(table.shape[1]))
    behaviors = batch * length
    positions = distinct.numel()
    out = []
    for m in methods:
        same: Optional[bool] = agrees if m == "cosine_topk" else None
        if m.startswith("cosine_topk["):  # a forced kernel: bit-identical to cosine_topk's result
            same = all(torch.equal(a, b) for a, b in zip(outputs[m], outputs["cosine_topk"]))
        row = Row(name, length, batch, per_user, m, best[m] * 1e3, behaviors / best[m], peaks[m],
                  vs_reference=best["reference"] / best[m], vs_index_select=best["index_select"] / best[m],
                  agrees=same, kernels=ran if m == "cosine_topk" else m[len("cosine_topk["):-1] or None)
        if m == "cosine_topk" and index is not None:
            row.bytes_read = gsu_pq.exact_bytes_read(positions, table, shadow is not None)
            row.table_bytes = gsu_pq.exact_table_bytes(table, shadow is not None)
        if m.startswith("pq"):
            row.kernels = m[m.index("[") + 1:-1] if "[" in m else f"pq_scan={kernels.pq_scan_kernel(index.m).name}"
            if "[" in m:  # another scan forced: its result must be identical to the chosen scan's
                row.agrees = all(torch.equal(a, b) for a, b in zip(outputs[m], outputs[m[:m.index("[")]]))
            row.recall_at_k = gsu_pq.recall_at_k(outputs[m], outputs["cosine_topk"])
            row.vs_cosine_topk = best["cosine_topk"] / best[m]
            row.bytes_read = gsu_pq.pq_bytes_read(positions, index, table, batch, rescore.get(m, 0))
            row.table_bytes = index.nbytes
        out.append(row)
    return out


def _peak_extra_mb(fn: Callable[[], object]) -> Tuple[object, Optional[float]]:
    """(fn(), peak resident memory above the current one in MB); None where /proc cannot reset the peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        result = fn()
        return result, (_status_kb("VmHWM") - base) / 1024
    except OSError:
        return fn(), None


def _load_average() -> Optional[List[float]]:
    """The system's 1, 5 and 15 minute load averages (other processes share the CPUs); None where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status: no {field}")


def _copy_bandwidth(repeats: int) -> float:
    """GB/s of a memcpy between two pre-written buffers of _COPY_BYTES (bytes copied per second)."""
    src = torch.ones(_COPY_BYTES, dtype=torch.uint8)
    dst = torch.zeros(_COPY_BYTES, dtype=torch.uint8)
    dst.copy_(src)
    best = float("inf")
    for _ in range(max(3, repeats)):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return _COPY_BYTES / best / 1e9


def _print(rows: List[Row]) -> None:
    for r in rows:
        shared = f", {r.samples_per_user} samples/user" if r.samples_per_user > 1 else ""
        peak = "n/a" if r.peak_extra_mb is None else f"{r.peak_extra_mb:8.1f} MB"
        extra = ""
        if r.method.startswith("pq"):
            extra = (f"  recall@K {r.recall_at_k:.4f}, x{r.vs_cosine_topk:.2f} vs cosine_topk, reads "
                     f"{r.bytes_read / 1e6:.1f} MB, scans a {r.table_bytes / _GB:.3f} GB table [{r.kernels}]"
                     + ("" if r.agrees is None else f", identical to the chosen scan's: {'yes' if r.agrees else 'NO'}"))
        elif r.method.startswith("cosine_topk"):
            same = "same top-k" if r.method == "cosine_topk" else "bit-identical"
            extra = f"  x{r.vs_reference:.1f} vs reference, {r.vs_index_select:.2f} of index_select, " \
                    f"{same}: {'yes' if r.agrees else 'NO'}" + (f" [{r.kernels}]" if r.method == "cosine_topk" else "")
            if r.bytes_read is not None:
                extra += f", reads {r.bytes_read / 1e6:.1f} MB, scans a {r.table_bytes / _GB:.3f} GB table"
        print(f"  {r.dtype:8s} L={r.length:<7d} B={r.batch:<5d}{shared:18s} {r.method:12s} {r.ms_per_batch:9.1f} ms"
              f"  {r.behaviors_per_s / 1e6:8.2f} M behaviors/s  peak +{peak}{extra}")


def _print_summary(rows: List[Row], copy_gbps: float) -> None:
    pq_rows = [r for r in rows if r.method.startswith("pq")]
    if pq_rows:
        print("\nsummary (approximate PQ GSU against cosine_topk, same run):")
        for r in pq_rows:
            shared = f" ({r.samples_per_user}/user)" if r.samples_per_user > 1 else ""
            exact = next(x for x in rows if x.method == "cosine_topk" and (x.dtype, x.length, x.samples_per_user) == (r.dtype, r.length, r.samples_per_user))
            print(f"  {r.dtype:8s} L={r.length:<7d}{shared:10s} {r.method:17s} recall@K {r.recall_at_k:.4f}  "
                  f"{r.ms_per_batch:8.1f} ms vs {exact.ms_per_batch:8.1f} ms (x{r.vs_cosine_topk:.2f})  "
                  f"table {exact.table_bytes / r.table_bytes:.2f}x smaller, reads {exact.bytes_read / r.bytes_read:.2f}x fewer bytes")
    print("\nsummary (cosine_topk, and with other kernels forced):")
    for r in rows:
        if r.method.startswith("cosine_topk"):
            shared = f" ({r.samples_per_user}/user)" if r.samples_per_user > 1 else ""
            label = "" if r.method == "cosine_topk" else f"  {r.method}"
            print(f"  {r.dtype:8s} L={r.length:<7d}{shared:10s} x{r.vs_reference:6.1f} vs reference   "
                  f"{r.vs_index_select:5.2f} of bare index_select   {r.behaviors_per_s / 1e6:7.2f} M behaviors/s{label}")
