"""Kernel selection for the GSU's exact int8 products: which implementation of each hot-path product runs is
measured on the host, once per process, instead of assumed.

Two products, both exact integer dot products of int8 rows of width D:

- ``filter`` (``model.gsu.filter``): gathered rows int8 [R, D] x targets int8 [D, G] -> dots [R, G], the
  prefilter of every piece of history (int8 tables, and the int8 shadow of bf16/float32 tables).
  Candidates: ``int_mm`` (``torch._int_mm``, int32 out: fast where oneDNN has VNNI/AMX int8 kernels, ~20x
  slower than ``float32`` on an AVX2-only AMD EPYC), ``float32`` (the rows converted into a reused float32
  buffer, ``torch.mm`` with float32 out) and ``native`` (``model.gsu.native``: a C loop compiled on the host that
  gathers the rows itself, prefetching ahead, and takes their int32 dots as it goes; offered only where a C
  compiler builds it). The filter's probe times each candidate on the gather it needs as well as its product.
  Chosen twice, for two regimes that favour different kernels: ``filter`` for blocks of few targets (a
  sample's own history: the gather bounds the time, probed at 1 and 8 targets) and ``filter_wide`` for blocks
  of many (a shared user's samples, packed short histories, serving's candidates: the arithmetic bounds it,
  where a BLAS ``mm`` beats the native loop; probed at 32). ``model.gsu.filter.WIDE_FROM`` divides them.
- ``dots`` (``model.gsu.cosine.exact_dots``): row-wise pairs int8 [n, D] . int8 [n, D] -> dots [n], the exact
  rescoring of candidates, the recent-window and SIM-hard scores and whole-history scores (serving runs the
  same stage, so it uses the same kernels). Candidates: ``int16`` (products in int16, sum in int32) and
  ``float32`` (products and sum in float32).

- ``dense`` (``model.gsu.topk._dense_topk``): serving's candidates int8 [C, D] against the U distinct items int8
  [U, D] of one history, every dot, then each target's top-k rank keys. Candidates: ``float32`` (``torch.mm`` of
  the converted rows, a bounded [c, U] block at a time, the selection by ``model.gsu.dense_select``'s C loop or
  torch ops) and ``native`` (``dense_select.topk_i8``: int32 sums of int8 products, ``_mm256_maddubs_epi16`` /
  ``_mm256_madd_epi16``, four targets at a time, each target's selection while its dots are in cache; offered
  where it builds). The probe: 64 targets against 4,096 items, k = 50, keys checked against float64.

A further op, ``pq_scan`` (``model.gsu.pq_scan``), picks the approximate GSU's scan for codes of M subspaces (the
width key is M): ``torch`` (the ``embedding_bag`` scan, everywhere) or ``native`` (``model.gsu.pq_native``'s C scan,
where a C compiler builds it). Both sum each estimate in subspace order in float32 and keep the same rank keys, so
they select identically; the probe (a 65,536-item code table, a 4,096-position history alone and shared by 4
targets, K' = 64, with tied estimates, then the re-scoring dots) checks each against a reference before timing.

Why every candidate is exact (so results are bit-identical whichever runs): an int8 entry has |v| <= 128, so
a product has |p| <= 2**14 and a dot of D products has every partial sum an integer of magnitude
<= D * 2**14. For D <= FLOAT32_EXACT_WIDTH = 1024 that is <= 2**24, and every integer of magnitude <= 2**24
is a float32: each product, each partial sum in any order (blocked BLAS, FMA, vectorised reductions) and the
result are exact, so float32 gives the same integer as int32 arithmetic (for D = 128: |dot| <= 128 * 127**2
= 2,064,512 < 2**24 with the table's [-127, 127] values). int16 holds every product (2**14 < 2**15) and int32
every sum. ``float32`` is therefore offered only for D <= 1024, ``int_mm`` not for D = 1 (wrong on CPU in
torch 2.13), and each candidate is also checked against a float64 product on the probe data before it is
timed (a candidate that disagrees is excluded, with the reason recorded).

Measurement: lazily, the first time a product of a given width is needed in a process (a DataLoader worker
measures in its own process; a forked one inherits its parent's measurements, taken on the same host), on a
representative probe (``_FILTER_ROWS`` gathered rows against 1 and 16 targets; ``_DOT_PAIRS`` pairs), best of
a few runs, a few ms in all, cached per (product, D, torch threads) behind a lock. The fastest candidate runs.

Override: ``MUSE_GSU_KERNEL=<name>`` forces ``name`` for every product that has it (``float32`` forces all),
``MUSE_GSU_KERNEL=filter=int_mm,dots=int16`` names them per product (``filter=`` names both filter regimes
unless ``filter_wide=`` is given too); an unknown name is a ``UserError``. A
forced candidate that is not exact at the table's width (``int_mm`` at D = 1, ``float32`` at D > 1024) is not
used (the measured choice runs, and the choice says why). ``choose(op, width)`` returns the ``Choice`` (kernel,
measured times, CPU capability); ``choices()`` lists those made in this process.
"""

import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from common.errors import UserError
from model.gsu import dense_select, native
from model.gsu.pq_scan import NativeScan, PQScan, TorchScan

ENV_VAR = "MUSE_GSU_KERNEL"
FILTER = "filter"
FILTER_WIDE = "filter_wide"
DOTS = "dots"
PQ_SCAN = "pq_scan"
DENSE = "dense"
# Widest D whose int8 dots are exact in float32: every partial sum <= D * 128**2 <= 2**24 (module docstring).
FLOAT32_EXACT_WIDTH = 2 ** 24 // 128 ** 2


def float32_exact(table: torch.Tensor) -> bool:
    """Whether every dot of two rows of ``table`` [N, D] is exact in a float32 product, in any summation order:
    an int8 table of D <= FLOAT32_EXACT_WIDTH (module docstring)."""
    return table.dtype == torch.int8 and table.shape[-1] <= FLOAT32_EXACT_WIDTH
# Probe sizes: 1,024 rows gathered from a probe table (128 KB at D = 128) against one target (a long
# single-sample history) and against 16 (a packed block or a shared user); 2,048 pairs.
_FILTER_ROWS = 1024
_PROBE_TABLE_ROWS = 8192  # 1 MB at D = 128: the probe's gathers leave L1 and most of L2, as the real ones do
_FILTER_COLUMNS = {FILTER: (1, 8), FILTER_WIDE: (32,)}
_DOT_PAIRS = 2048
_REPEATS = 3
# A candidate already this many times slower than the best after one timed run is not timed again.
_GIVE_UP = 4.0


class FilterKernel:
    """int8 rows [R, D] x int8 columns [D, G] -> exact dots [R, G] of ``out_dtype``.

    ``columns(targets)`` prepares a target matrix once (the filter caches it per block of samples; its width
    G' >= G, extra columns zero); ``workspace(rows, width)`` is the caller's reusable scratch;
    ``mm(rows, columns, out, work)`` writes ``out`` [R, G'] (R <= the workspace's rows). A kernel with
    ``gathers`` set reads the rows itself: ``gather_mm(table, ids, columns, out)`` writes the dots of rows
    ``ids`` [R] of ``table`` [N, D] (any R) and returns -1, or the first index of ``ids`` outside the table."""

    name = ""
    out_dtype = torch.int32
    gathers = False

    def supports(self, width: int) -> bool:
        raise NotImplementedError

    def unsupported(self, width: int) -> str:
        """Why ``supports(width)`` is False (the probe's note for an excluded kernel)."""
        return f"unsupported for D={width}"

    def columns(self, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def workspace(self, rows: int, width: int) -> torch.Tensor:
        raise NotImplementedError

    def mm(self, rows: torch.Tensor, columns: torch.Tensor, out: torch.Tensor, work: torch.Tensor) -> None:
        raise NotImplementedError


class IntMM(FilterKernel):
    """``torch._int_mm``: int32 out; G > 1 padded with zero columns to a multiple of 8 (much faster there)."""

    name = "int_mm"
    out_dtype = torch.int32

    def supports(self, width: int) -> bool:
        return width > 1

    def columns(self, targets: torch.Tensor) -> torch.Tensor:
        count = targets.shape[1]
        if count > 1 and count % 8:
            targets = torch.nn.functional.pad(targets, (0, 8 - count % 8))
        return targets.contiguous()

    def workspace(self, rows: int, width: int) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int8)

    def mm(self, rows: torch.Tensor, columns: torch.Tensor, out: torch.Tensor, work: torch.Tensor) -> None:
        torch._int_mm(rows, columns, out=out)


class Float32MM(FilterKernel):
    """float32 ``torch.mm`` of the rows converted into a reused buffer: float32 out, the exact integers."""

    name = "float32"
    out_dtype = torch.float32

    def supports(self, width: int) -> bool:
        return width <= FLOAT32_EXACT_WIDTH

    def unsupported(self, width: int) -> str:
        return f"not exact for D={width}"

    def columns(self, targets: torch.Tensor) -> torch.Tensor:
        return targets.to(torch.float32).contiguous()

    def workspace(self, rows: int, width: int) -> torch.Tensor:
        return torch.empty(rows, width, dtype=torch.float32)

    def mm(self, rows: torch.Tensor, columns: torch.Tensor, out: torch.Tensor, work: torch.Tensor) -> None:
        converted = work[: rows.shape[0]]
        converted.copy_(rows)
        torch.mm(converted, columns, out=out)


class NativeFilter(FilterKernel):
    """``model.gsu.native``: the rows gathered and dotted in one prefetching C loop (int16 products, int32 sums),
    compiled on the host; offered only where it builds. Columns: [D, G'] int16, the transpose of a contiguous
    [G', D] (each target's entries adjacent, as the loop reads them); G' = 1 or G rounded up to a multiple of 8
    (zero targets)."""

    name = "native"
    out_dtype = torch.int32
    gathers = True

    def supports(self, width: int) -> bool:
        return native.library() is not None

    def unsupported(self, width: int) -> str:
        return f"unavailable: {native.unavailable_reason()}"

    def columns(self, targets: torch.Tensor) -> torch.Tensor:
        columns = targets.t().to(torch.int16)
        count = columns.shape[0]
        if count > 1 and count % 8:
            columns = torch.nn.functional.pad(columns, (0, 0, 0, 8 - count % 8))
        return columns.contiguous().t()

    def workspace(self, rows: int, width: int) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int8)

    def gather_mm(self, table: torch.Tensor, ids: torch.Tensor, columns: torch.Tensor, out: torch.Tensor) -> int:
        return native.gather_dots(table.contiguous(), ids.contiguous(), columns.t(), out)


class DotsKernel:
    """Row-wise int8 pairs [..., D] . [..., D] (broadcastable) -> float64 [...] exact dots."""

    name = ""

    def supports(self, width: int) -> bool:
        raise NotImplementedError

    def unsupported(self, width: int) -> str:
        """Why ``supports(width)`` is False."""
        return f"unsupported for D={width}"

    def dots(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int16Dots(DotsKernel):
    """Products in int16 (|p| <= 2**14), summed in int32."""

    name = "int16"

    def supports(self, width: int) -> bool:
        return True

    def dots(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (rows.to(torch.int16) * targets.to(torch.int16)).sum(-1, dtype=torch.int32).double()


class Float32Dots(DotsKernel):
    """Products and sum in float32 (exact for D <= FLOAT32_EXACT_WIDTH)."""

    name = "float32"

    def supports(self, width: int) -> bool:
        return width <= FLOAT32_EXACT_WIDTH

    def unsupported(self, width: int) -> str:
        return f"not exact for D={width}"

    def dots(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (rows.to(torch.float32) * targets.to(torch.float32)).sum(-1).double()


class DenseKernel:
    """The dense broadcast top-k's products and selection (``model.gsu.topk._dense_topk``): ``keys(targets int8
    [C, D], items int8 [U, D], inverse float32 [U], sq_items [U], sq_targets [C], k, stride)`` -> int64 [C, k]
    each target's k best rank keys over the items, descending (``model.gsu.dense_select``'s steps)."""

    name = ""

    def supports(self, width: int) -> bool:
        raise NotImplementedError

    def unsupported(self, width: int) -> str:
        """Why ``supports(width)`` is False."""
        return f"unsupported for D={width}"

    def keys(self, targets: torch.Tensor, items: torch.Tensor, inverse: torch.Tensor, sq_items: torch.Tensor,
             sq_targets: torch.Tensor, k: int, stride: int) -> torch.Tensor:
        raise NotImplementedError


class Float32Dense(DenseKernel):
    """float32 ``torch.mm`` of the targets with the items (both converted; the exact integers), a bounded number
    of (target, item) dots at a time, each block's keys by ``dense_select.select_keys`` (torch ops without it)."""

    name = "float32"

    def supports(self, width: int) -> bool:
        return width <= FLOAT32_EXACT_WIDTH

    def unsupported(self, width: int) -> str:
        return f"not exact for D={width}"

    def keys(self, targets: torch.Tensor, items: torch.Tensor, inverse: torch.Tensor, sq_items: torch.Tensor,
             sq_targets: torch.Tensor, k: int, stride: int) -> torch.Tensor:
        from model.gsu.topk import float32_dense_keys  # not at module level: topk imports this module

        return float32_dense_keys(targets, items, inverse, sq_items, sq_targets, k, stride)


class NativeDense(DenseKernel):
    """``dense_select.topk_i8``: int16 products and int32 sums of a few targets at a time against every item,
    each target's selection while its dots are in cache (no float32 [C, U] product); offered where it builds (the
    ``float32`` kernel's work where the library is gone after the choice)."""

    name = "native"

    def supports(self, width: int) -> bool:
        return dense_select.LIBRARY.function("muse_dense_topk_i8") is not None

    def unsupported(self, width: int) -> str:
        return f"unavailable: {dense_select.LIBRARY.reason()}"

    def keys(self, targets: torch.Tensor, items: torch.Tensor, inverse: torch.Tensor, sq_items: torch.Tensor,
             sq_targets: torch.Tensor, k: int, stride: int) -> torch.Tensor:
        keys = dense_select.topk_i8(targets, items, inverse, sq_items, sq_targets, k, stride)
        return keys if keys is not None else Float32Dense().keys(targets, items, inverse, sq_items, sq_targets, k, stride)


_FILTERS = (Float32MM(), IntMM(), NativeFilter())
KERNELS: Dict[str, Tuple] = {FILTER: _FILTERS, FILTER_WIDE: _FILTERS, DOTS: (Int16Dots(), Float32Dots()),
                              PQ_SCAN: (TorchScan(), NativeScan()), DENSE: (Float32Dense(), NativeDense())}


@dataclass(frozen=True)
class Choice:
    """The kernel one product runs at one width in this process.

    name: the kernel; forced: named by MUSE_GSU_KERNEL; times_ms: measured best ms of each timed candidate on
    the probe; excluded: candidate -> why it was not timed (not exact at this width, or disagreed with float64);
    note: why a forced kernel was not used (empty otherwise); cpu_capability:
    ``torch.backends.cpu.get_cpu_capability()`` (e.g. AVX2, AVX512); threads: torch threads when measured."""

    op: str
    width: int
    name: str
    forced: bool
    times_ms: Dict[str, float]
    excluded: Dict[str, str]
    cpu_capability: str
    threads: int
    note: str = ""
    kernel: object = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        """One line: the kernel, how it was chosen and every candidate's measured time."""
        how = "forced by " + ENV_VAR if self.forced else "fastest measured"
        times = ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(self.times_ms.items(), key=lambda item: item[1]))
        extra = "".join(f"; {n} excluded ({why})" for n, why in self.excluded.items())
        note = f"; {self.note}" if self.note else ""
        return (f"{self.op} ({'M' if self.op == PQ_SCAN else 'D'}={self.width}): {self.name} ({how}; {times or 'nothing timed'}{extra}{note}; "
                f"cpu {self.cpu_capability}, {self.threads} thread(s))")

    def to_dict(self) -> Dict[str, object]:
        return {"op": self.op, "width": self.width, "kernel": self.name, "forced": self.forced,
                "times_ms": dict(self.times_ms), "excluded": dict(self.excluded), "note": self.note,
                "cpu_capability": self.cpu_capability, "threads": self.threads}


@dataclass(frozen=True)
class _Measured:
    times_ms: Dict[str, float]
    excluded: Dict[str, str]
    cpu_capability: str


_LOCK = threading.Lock()
_MEASURED: Dict[Tuple[str, int, int], _Measured] = {}
_CHOICES: Dict[Tuple[str, int, int, str], Choice] = {}
measure_count = 0  # probes measured in this process (one per product, width and thread count)


def _after_fork_in_child() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # a fork while another thread held the lock must not leave the child blocked


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def filter_kernel(width: int, wide: bool = False) -> FilterKernel:
    """The ``FilterKernel`` the prefilter runs for rows of ``width`` int8 values against a few targets, or against
    many (``wide``: a shared user's or a packed block's, serving's candidates), where the product, not the gather,
    bounds the time and another kernel may win."""
    return choose(FILTER_WIDE if wide else FILTER, width).kernel


def dots_kernel(width: int) -> DotsKernel:
    """The ``DotsKernel`` exact rescoring runs for pairs of ``width`` int8 values."""
    return choose(DOTS, width).kernel


def dense_kernel(width: int) -> DenseKernel:
    """The ``DenseKernel`` the dense broadcast top-k (serving's candidates against one history) runs for int8 rows
    of ``width`` values."""
    return choose(DENSE, width).kernel


def pq_scan_kernel(m: int) -> PQScan:
    """The ``PQScan`` the approximate GSU runs for codes of ``m`` subspaces (scan and re-scoring dots)."""
    return choose(PQ_SCAN, m).kernel


def choose(op: str, width: int) -> Choice:
    """The ``Choice`` for product ``op`` (FILTER | FILTER_WIDE | DOTS | PQ_SCAN | DENSE) at row width ``width`` (PQ_SCAN: M
    subspaces): the override if set and exact at this width, else the fastest measured candidate (measured once
    per process, width and thread count)."""
    if op not in KERNELS:
        raise ValueError(f"op: expected one of {', '.join(KERNELS)}, got {op!r}")
    setting = os.environ.get(ENV_VAR, "")
    threads = torch.get_num_threads()
    key = (op, width, threads, setting)
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    forced = parse_override(setting).get(op)
    with _LOCK:
        choice = _CHOICES.get(key)  # another thread may have made it meanwhile
        if choice is None:
            measured = _MEASURED.get(key[:3])
            if measured is None:
                measured = _measure(op, width)
                _MEASURED[key[:3]] = measured
            choice = _decide(op, width, threads, forced, measured)
            _CHOICES[key] = choice
    return choice


def choices() -> List[Choice]:
    """Every ``Choice`` made in this process (all overrides seen), in the order they were made."""
    return list(_CHOICES.values())


def check_override() -> None:
    """UserError if MUSE_GSU_KERNEL is set to something unknown (call where the user's settings are read)."""
    parse_override(os.environ.get(ENV_VAR, ""))


def parse_override(setting: str) -> Dict[str, str]:
    """MUSE_GSU_KERNEL's value -> {op: kernel name}. "" -> {}; "float32" -> every op that has it;
    "filter=native,dots=int16" -> per op. UserError (one line naming the variable) for anything unknown."""
    setting = setting.strip()
    if not setting:
        return {}
    known = "; ".join(f"{op}: {', '.join(k.name for k in KERNELS[op])}" for op in KERNELS)
    out: Dict[str, str] = {}
    for part in (p.strip() for p in setting.split(",")):
        op, _, name = part.rpartition("=")
        ops = [op] if op else [o for o in KERNELS if any(k.name == name for k in KERNELS[o])]
        if op and op not in KERNELS:
            raise UserError(f"{ENV_VAR}={setting}: unknown product {op!r} (known: {', '.join(KERNELS)})")
        if not ops or any(all(k.name != name for k in KERNELS[o]) for o in ops):
            raise UserError(f"{ENV_VAR}={setting}: unknown kernel {name!r} (known: {known})")
        out.update({o: name for o in ops})
    if FILTER in out and not any(p.strip().startswith(FILTER_WIDE + "=") for p in setting.split(",")):
        out[FILTER_WIDE] = out[FILTER]  # "filter=X" names the filter's kernel in both regimes
    return out


def _decide(op: str, width: int, threads: int, forced: Optional[str], measured: _Measured) -> Choice:
    by_name = {k.name: k for k in KERNELS[op]}
    note = ""
    if forced is not None and forced in measured.excluded:
        note = f"{ENV_VAR} names {forced}, not used: {measured.excluded[forced]}"
        forced = None
    if forced is not None:
        name = forced
    elif measured.times_ms:
        name = min(measured.times_ms, key=measured.times_ms.get)
    else:
        raise RuntimeError(f"no exact {op} kernel for width {width}: {measured.excluded}")
    return Choice(op, width, name, forced is not None, dict(measured.times_ms), dict(measured.excluded),
                  measured.cpu_capability, threads, note, by_name[name])


def _measure(op: str, width: int) -> _Measured:
    """Best-of-_REPEATS ms of every candidate exact at ``width`` on the probe (after one warm-up run that is
    also checked against float64). The candidates are timed in turns (one run of each, _REPEATS rounds), so a
    burst of load from another process slows all of them alike instead of one; a candidate already _GIVE_UP
    times behind the best after the first round is not timed again."""
    global measure_count
    measure_count += 1
    generator = torch.Generator().manual_seed(width)
    run, reference, data = _PROBES[op]
    probe = data(op, width, generator)
    expected = reference(*probe)
    excluded: Dict[str, str] = {}
    states: Dict[str, Tuple[FilterKernel, object]] = {}
    for kernel in KERNELS[op]:
        if not kernel.supports(width):
            excluded[kernel.name] = kernel.unsupported(width)
            continue
        try:
            prepared = run(kernel, *probe, None)
            if not all(_same(got, want) for got, want in zip(prepared[0], expected)):
                excluded[kernel.name] = "disagreed with float64 on the probe"
                continue
        except RuntimeError as err:
            excluded[kernel.name] = f"failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            continue
        states[kernel.name] = (kernel, prepared[1])
    best: Dict[str, float] = {name: math.inf for name in states}
    for attempt in range(_REPEATS):
        for name, (kernel, state) in states.items():
            if attempt and best[name] > _GIVE_UP * min(best.values()):
                continue
            start = time.perf_counter()
            run(kernel, *probe, state)
            best[name] = min(best[name], time.perf_counter() - start)
    times = {name: seconds * 1e3 for name, seconds in best.items()}
    return _Measured(times, excluded, _cpu_capability())


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal values: compared as they are when the dtypes match (int64 keys), else as float64 (products)."""
    return torch.equal(got, want) if got.dtype == want.dtype else torch.equal(got.double(), want)


def _probe_data(op: str, width: int, generator: torch.Generator) -> Tuple[torch.Tensor, ...]:
    """Random int8 probe data including the extremes -128 and 127 (the exactness bound's worst case). FILTER:
    (table [_PROBE_TABLE_ROWS, D], ids [_FILTER_ROWS] of random rows, targets [D, max columns]), so every
    candidate is timed on the gather it needs as well as its product; DOTS: (rows, targets) pairs."""
    if op != DOTS:
        table = torch.randint(-128, 128, (_PROBE_TABLE_ROWS, width), dtype=torch.int8, generator=generator)
        ids = torch.randint(0, _PROBE_TABLE_ROWS, (_FILTER_ROWS,), generator=generator)
        targets = torch.randint(-128, 128, (width, max(_FILTER_COLUMNS[op])), dtype=torch.int8, generator=generator)
        table[ids[0]], targets[:, 0] = -128, -128
        return table, ids, targets, _FILTER_COLUMNS[op]
    rows = torch.randint(-128, 128, (_DOT_PAIRS, width), dtype=torch.int8, generator=generator)
    targets = torch.randint(-128, 128, (_DOT_PAIRS, width), dtype=torch.int8, generator=generator)
    rows[0], targets[0] = -128, -128
    return rows, targets


def _filter_run(kernel: FilterKernel, table: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor,
                counts: Tuple[int, ...], state) -> Tuple[List[torch.Tensor], object]:
    """The probe of FILTER: the rows ``ids`` of ``table`` gathered (by ``index_select`` into a reused buffer, or
    by a gathering kernel itself) and multiplied by each of ``counts`` targets (_FILTER_COLUMNS). state: buffer,
    prepared columns, outputs and workspace from the first (untimed) run, or None there."""
    if state is None:
        work = kernel.workspace(ids.shape[0], table.shape[1])
        prepared = [kernel.columns(targets[:, :count]) for count in counts]
        outs = [torch.empty(ids.shape[0], c.shape[1], dtype=kernel.out_dtype) for c in prepared]
        state = (torch.empty(ids.shape[0], table.shape[1], dtype=table.dtype), work, prepared, outs)
    buffer, work, prepared, outs = state
    for columns, out in zip(prepared, outs):
        if kernel.gathers:
            kernel.gather_mm(table, ids, columns, out)
        else:
            kernel.mm(torch.index_select(table, 0, ids, out=buffer), columns, out, work)
    return [out[:, :count] for out, count in zip(outs, counts)], state


def _filter_reference(table: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor,
                      counts: Tuple[int, ...]) -> List[torch.Tensor]:
    rows = table.index_select(0, ids).double()
    return [torch.mm(rows, targets[:, :count].double()) for count in counts]


def _dots_run(kernel: DotsKernel, rows: torch.Tensor, targets: torch.Tensor, state) -> Tuple[List[torch.Tensor], object]:
    return [kernel.dots(rows, targets)], True


def _dots_reference(rows: torch.Tensor, targets: torch.Tensor) -> List[torch.Tensor]:
    return [(rows.double() * targets.double()).sum(-1)]


# The PQ probe: 65,536 items' codes (1 MB at M = 16, out of L2 as a real code table is), a history of 4,096
# positions (1 in 16 padding) shared by 1 and by 4 targets, K' = 64 candidates re-scored on a 4,096-row table.
_PQ_ROWS, _PQ_LENGTH, _PQ_GROUPS, _PQ_CANDIDATES, _PQ_TABLE_ROWS = 65536, 4096, (1, 4), 64, 4096


def _pq_probe_data(op: str, m: int, generator: torch.Generator) -> Tuple[torch.Tensor, ...]:
    """(codes uint8 [_PQ_ROWS, M], luts float32 [5, M * 256], history int64 [5, L] (rows 1-4 one shared history),
    table int8 [_PQ_TABLE_ROWS, 128], candidate ids [5, K'], target ids [5]). The lookup tables hold ties (values
    on a coarse grid), so the probe checks the position order among equal estimates too."""
    codes = torch.randint(0, 256, (_PQ_ROWS, m), dtype=torch.uint8, generator=generator)
    count = sum(_PQ_GROUPS)
    luts = torch.randint(-8, 9, (count, m * 256), generator=generator).to(torch.float32) / 64
    history = torch.randint(1, _PQ_ROWS, (count, _PQ_LENGTH), generator=generator)
    history[:, ::16] = 0
    history[2:] = history[1]
    table = torch.randint(-128, 128, (_PQ_TABLE_ROWS, 128), dtype=torch.int8, generator=generator)
    candidates = torch.randint(0, _PQ_TABLE_ROWS, (count, _PQ_CANDIDATES), generator=generator)
    return codes, luts, history, table, candidates, torch.arange(1, count + 1)


def _pq_run(kernel: PQScan, codes: torch.Tensor, luts: torch.Tensor, history: torch.Tensor, table: torch.Tensor,
            candidates: torch.Tensor, targets: torch.Tensor, state) -> Tuple[List[torch.Tensor], object]:
    """The probe of PQ_SCAN: the scan of one single-sample history and one shared by 4 targets, then the
    re-scoring dots; keys sorted per sample (a kernel may leave them in any order)."""
    groups = [[0], list(range(1, sum(_PQ_GROUPS)))]
    keys = kernel.scan(codes, luts, history, groups, _PQ_CANDIDATES, 1 << 15)
    return [torch.sort(keys, dim=1).values, kernel.rescore_dots(table, candidates, targets)], True


def _pq_reference(codes: torch.Tensor, luts: torch.Tensor, history: torch.Tensor, table: torch.Tensor,
                  candidates: torch.Tensor, targets: torch.Tensor) -> List[torch.Tensor]:
    """The estimates summed subspace by subspace in float32 (the order both kernels use), clamped, every
    position's key, a full top-K'; float64 dots."""
    from model.gsu.ranking import NO_KEY, rank_keys  # not at module level: ranking -> cosine -> this module

    m = codes.shape[1]
    est = torch.zeros(history.shape, dtype=torch.float32)
    for j in range(m):
        est = est + luts[:, j * 256:(j + 1) * 256].gather(1, codes[history, j].long())
    est = est.clamp(-1.0, 1.0) + 0.0
    keys = torch.where(history != 0, rank_keys(est, torch.arange(history.shape[1]).expand_as(history)),
                       torch.full((), NO_KEY))
    top = torch.sort(torch.topk(keys, _PQ_CANDIDATES, dim=1).values, dim=1).values
    rows = table.index_select(0, candidates.reshape(-1)).double().view(*candidates.shape, -1)
    return [top, (rows * table.index_select(0, targets).double()[:, None, :]).sum(-1)]


# The dense probe: 64 targets against 4,096 distinct items (512 KB of int8 rows, out of L2 as float32), k = 50.
_DENSE_TARGETS, _DENSE_ITEMS, _DENSE_K = 64, 4096, 50


def _dense_probe_data(op: str, width: int, generator: torch.Generator) -> Tuple[torch.Tensor, ...]:
    """(targets int8 [_DENSE_TARGETS, D], items int8 [_DENSE_ITEMS, D] with repeated rows (equal scores: the
    position order is checked too) and the extremes -128 / 127, inverse [U], sq_items [U], sq_targets [C])."""
    targets = torch.randint(-128, 128, (_DENSE_TARGETS, width), dtype=torch.int8, generator=generator)
    items = torch.randint(-128, 128, (_DENSE_ITEMS, width), dtype=torch.int8, generator=generator)
    items[::9] = items[1].clone()
    items[0], targets[0] = -128, 127
    sq_items, sq_targets = (items.double() ** 2).sum(1), (targets.double() ** 2).sum(1)
    inverse = (1.0 / sq_items.sqrt()).to(torch.float32)
    return targets, items, inverse, sq_items, sq_targets


def _dense_run(kernel: DenseKernel, targets: torch.Tensor, items: torch.Tensor, inverse: torch.Tensor,
               sq_items: torch.Tensor, sq_targets: torch.Tensor, state) -> Tuple[List[torch.Tensor], object]:
    return [kernel.keys(targets, items, inverse, sq_items, sq_targets, _DENSE_K, 1)], True


def _dense_reference(targets: torch.Tensor, items: torch.Tensor, inverse: torch.Tensor, sq_items: torch.Tensor,
                     sq_targets: torch.Tensor) -> List[torch.Tensor]:
    """Every item's exact cosine and rank key (float64 dots), a full top-k."""
    from model.gsu.cosine import cosines  # not at module level: cosine imports this module
    from model.gsu.ranking import rank_keys

    dots = torch.mm(targets.double(), items.double().t())
    scores = cosines(dots, sq_items[None, :], sq_targets[:, None])
    keys = rank_keys(scores, torch.arange(items.shape[0]).expand_as(scores))
    return [torch.topk(keys, _DENSE_K, dim=1).values]


_PROBES = {FILTER: (_filter_run, _filter_reference, _probe_data), FILTER_WIDE: (_filter_run, _filter_reference, _probe_data),
           DOTS: (_dots_run, _dots_reference, _probe_data), PQ_SCAN: (_pq_run, _pq_reference, _pq_probe_data),
           DENSE: (_dense_run, _dense_reference, _dense_probe_data)}


def _cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"
