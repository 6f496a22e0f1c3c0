"""Kernel selection (model/gsu/kernels.py): every kernel gives the same exact products, so forcing any of them
leaves cosine_topk, the filter's dots and the pair scores bit-identical; the MUSE_GSU_KERNEL override and its
errors; one measurement per process and width."""

import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from cli.main import main
from common.errors import UserError
from model.config import ModelConfig
from model.gsu import GsuStage, cosine_topk, history_cosines, pair_cosine
from model.gsu import kernels, native
from model.gsu.cosine import exact_dots
from model.gsu.filter import WIDE_FROM, FilterDots
from model.gsu.shadow import filter_shadow
from model.gsu.table import row_norms

# Every (filter, dots) pair of kernels, as the override names them.
SETTINGS = [f"filter={f},dots={d}" for f in ("int_mm", "float32", "native") for d in ("int16", "float32")]


def extreme_table(n: int, d: int, seed: int) -> torch.Tensor:
    """Random int8 rows with many entries at the extremes -127 and 127 (the exactness bound's worst case), a few
    rows entirely at an extreme, and row 0 padding."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(-127, 128, (n, d), dtype=torch.int8, generator=g)
    extreme = torch.rand(n, d, generator=g) < 0.3
    table[extreme] = torch.where(torch.rand(int(extreme.sum()), generator=g) < 0.5, -127, 127).to(torch.int8)
    table[1:4] = 127
    table[4:6] = -127
    table[0] = 0
    return table


def history(batch: int, length: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, n, (batch, length), generator=g)
    hist[1, : length // 3] = 0  # left padding
    hist[2::3] = hist[0]  # shared histories (packed blocks)
    return hist


def under(monkeypatch, setting: str, fn):
    monkeypatch.setenv(kernels.ENV_VAR, setting)
    return fn()


@pytest.mark.parametrize("width", [1, 3, 128])
def test_forcing_each_kernel_gives_identical_cosine_topk(monkeypatch, width):
    table = extreme_table(3000, width, width)
    hist = history(12, 700, table.shape[0], width)
    targets = torch.tensor([1, 4, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
    norms = row_norms(table)
    results = {s: under(monkeypatch, s, lambda: cosine_topk(table, targets, hist, 20, norms=norms, chunk_rows=256))
               for s in SETTINGS}
    first = results[SETTINGS[0]]
    for setting, result in results.items():
        for got, want in zip(result, first):
            assert torch.equal(got, want), setting
    # and they are the exact top-k: every selected score equals the pair's own cosine
    scores, positions, valid = first
    ids = hist.gather(1, positions)[valid]
    assert torch.equal(scores[valid], pair_cosine(table, norms, ids, targets[:, None].expand_as(positions)[valid]))


@pytest.mark.parametrize("width", [1, 3, 128])
def test_forcing_each_kernel_gives_identical_filter_products(monkeypatch, width):
    """FilterDots' block products equal the int64 products for every kernel (int8 table and a bf16 table's shadow)."""
    table = extreme_table(5000, width, 10 + width)
    ids = torch.randint(0, table.shape[0], (4500,), generator=torch.Generator().manual_seed(width))  # > one gather
    ids[:3] = torch.tensor([1, 4, 0])
    targets = torch.tensor([1, 4, 2, 5, 6, 7, 8, 9, 10, 11])
    samples = list(range(targets.shape[0]))
    bf16 = (table.float() / 127).to(torch.bfloat16)
    for source in (table, bf16):
        norms = row_norms(source)
        shadow = None if source.dtype == torch.int8 else filter_shadow(source, norms.sq_norm)
        rows = table if shadow is None else shadow.rows
        assert len(samples) >= WIDE_FROM
        for count in (1, len(samples)):
            outputs = []
            for setting in SETTINGS:
                filters = under(monkeypatch, setting, lambda: FilterDots(source, norms, targets, 8192, shadow))
                kernel = filters.product(count).kernel  # count 10 is a wide block: filter= forces both regimes
                if width > 1:
                    assert kernel.name == setting.split(",")[0].split("=")[1]
                dots = filters.block_dots(ids, samples[:count])
                assert dots.dtype == kernel.out_dtype
                outputs.append(dots.long())
            expected = rows[ids].long() @ filters.filter_targets[:count].long().t()
            for setting, got in zip(SETTINGS, outputs):
                assert torch.equal(got, expected), (source.dtype, count, setting)


@pytest.mark.parametrize("width", [1, 128, 1024, 1025])
def test_forcing_each_kernel_gives_identical_exact_dots(monkeypatch, width):
    """Exact dots at the extremes, up to the widest float32-exact width (1024, where -128 x -128 rows reach 2**24)
    and past it (float32 is then not used even when forced)."""
    g = torch.Generator().manual_seed(width)
    rows = torch.randint(-128, 128, (300, width), dtype=torch.int8, generator=g)
    targets = torch.randint(-128, 128, (300, width), dtype=torch.int8, generator=g)
    rows[0], targets[0], rows[1], targets[1] = -128, -128, 127, -127
    expected = (rows.long() * targets.long()).sum(-1).double()
    for setting in ("dots=int16", "dots=float32"):
        assert torch.equal(under(monkeypatch, setting, lambda: exact_dots(rows, targets)), expected), setting
    choice = under(monkeypatch, "dots=float32", lambda: kernels.choose(kernels.DOTS, width))
    assert choice.forced == (width <= kernels.FLOAT32_EXACT_WIDTH)
    assert choice.name == ("float32" if width <= 1024 else "int16")


def test_pair_and_history_scores_are_identical_under_each_kernel(monkeypatch):
    table = extreme_table(800, 16, 3)
    norms = row_norms(table)
    hist = history(5, 300, table.shape[0], 3)
    targets = torch.tensor([1, 2, 4, 5, 9])
    results = [under(monkeypatch, s, lambda: history_cosines(table, norms, targets, hist, chunk_rows=200))
               for s in SETTINGS]
    for got in results[1:]:
        assert torch.equal(got, results[0])


def test_the_override_forces_and_names_kernels(monkeypatch):
    for setting, filt, dots in (("float32", "float32", "float32"), ("int_mm", "int_mm", None),
                                ("filter=int_mm, dots=int16", "int_mm", "int16"), ("dots=float32", None, "float32")):
        monkeypatch.setenv(kernels.ENV_VAR, setting)
        f, d = kernels.choose(kernels.FILTER, 64), kernels.choose(kernels.DOTS, 64)
        assert (f.name, f.forced) == ((filt, True) if filt else (f.name, False)), setting
        assert (d.name, d.forced) == ((dots, True) if dots else (d.name, False)), setting
    monkeypatch.setenv(kernels.ENV_VAR, "int_mm")
    narrow = kernels.choose(kernels.FILTER, 1)  # _int_mm is not used at D = 1 even when forced
    assert narrow.name != "int_mm" and not narrow.forced and "int_mm" in narrow.note and "int_mm" in narrow.excluded
    monkeypatch.delenv(kernels.ENV_VAR)
    measured = kernels.choose(kernels.FILTER, 64)
    assert not measured.forced and measured.name == min(measured.times_ms, key=measured.times_ms.get)
    offered = {"int_mm", "float32"} | ({"native"} if native.library() is not None else set())
    assert set(measured.times_ms) == offered and all(t > 0 for t in measured.times_ms.values())
    assert measured.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert "int_mm" in measured.describe() and measured.to_dict()["kernel"] == measured.name
    assert measured in kernels.choices()


@pytest.mark.parametrize("setting", ["bogus", "filter=int16", "dots=int_mm", "gather=float32", "float32,nope"])
def test_a_bad_override_is_one_clear_user_error(monkeypatch, setting):
    monkeypatch.setenv(kernels.ENV_VAR, setting)
    with pytest.raises(UserError) as err:
        kernels.choose(kernels.FILTER, 128)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{kernels.ENV_VAR}={setting}: unknown")
    with pytest.raises(UserError):  # the stage checks it where it is built, before any data worker starts
        GsuStage(ModelConfig.preset("muse"), extreme_table(10, 8, 0))


def test_bench_gsu_refuses_a_bad_override_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    assert main(["bench", "gsu", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and kernels.ENV_VAR in err


def test_the_cache_measures_once_per_width(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    width = 37  # used by no other test
    before = kernels.measure_count
    threads = [threading.Thread(target=kernels.choose, args=(kernels.FILTER, width)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = kernels.choose(kernels.FILTER, width)
    for setting in ("float32", "int_mm", ""):  # another override makes another choice, not another measurement
        monkeypatch.setenv(kernels.ENV_VAR, setting)
        kernels.choose(kernels.FILTER, width)
    monkeypatch.delenv(kernels.ENV_VAR)
    assert kernels.measure_count == before + 1
    assert kernels.choose(kernels.FILTER, width) is first
    kernels.choose(kernels.DOTS, width)
    assert kernels.measure_count == before + 2


@pytest.mark.parametrize("setting", ["filter=native", "filter=float32"])
def test_an_id_outside_the_table_is_a_value_error_naming_history_ids(monkeypatch, setting):
    table = extreme_table(500, 128, 3)
    hist = history(4, 600, table.shape[0], 4)
    hist[2, 590] = table.shape[0]  # past the last row, in the newest piece
    monkeypatch.setenv(kernels.ENV_VAR, setting)
    with pytest.raises(ValueError, match="history_ids"):
        cosine_topk(table, torch.tensor([1, 2, 3, 4]), hist, 10, chunk_rows=256)


@pytest.mark.skipif(native.library() is None, reason="no C compiler here: " + native.unavailable_reason())
@pytest.mark.parametrize("width", [16, 48, 128, 130])
@pytest.mark.parametrize("count", [1, 8, 11])
def test_the_native_kernel_gives_the_int64_products(width, count):
    """Both C branches (AVX2 for D % 16 == 0, portable otherwise), one target and blocks of 8 with padding."""
    table = extreme_table(3000, width, width + count)
    g = torch.Generator().manual_seed(count)
    ids = torch.randint(0, table.shape[0], (1000,), generator=g)
    targets = table[torch.randint(1, table.shape[0], (count,), generator=g)].t()  # [D, G]
    kernel = kernels.NativeFilter()
    columns = kernel.columns(targets)
    out = torch.full((ids.shape[0], columns.shape[1]), 7, dtype=torch.int32)
    assert kernel.gather_mm(table, ids, columns, out) == -1
    want = table.index_select(0, ids).long() @ targets.long()
    assert torch.equal(out[:, :count].long(), want)
    assert not bool(out[:, count:].any())  # the padding targets are zeros
    bad = ids.clone()
    bad[321] = -1
    assert kernel.gather_mm(table, bad, columns, out) == 321


def test_without_a_compiler_the_native_kernel_is_not_offered(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "LIBRARY", native.LIBRARY.fresh())
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    assert native.library() is None and "no-such-cc" in native.unavailable_reason()
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_MEASURED", {})
    monkeypatch.setattr(kernels, "_CHOICES", {})
    choice = kernels.choose(kernels.FILTER, 128)
    assert choice.name != "native" and "unavailable" in choice.excluded["native"]
    monkeypatch.setenv(kernels.ENV_VAR, "filter=native")  # forced but unavailable: the measured choice runs
    forced = kernels.choose(kernels.FILTER, 128)
    assert forced.name == choice.name and not forced.forced and "native" in forced.note


def test_filter_names_both_regimes_unless_filter_wide_is_given(monkeypatch):
    assert kernels.parse_override("filter=int_mm") == {kernels.FILTER: "int_mm", kernels.FILTER_WIDE: "int_mm"}
    assert kernels.parse_override("filter=int_mm,filter_wide=float32") == {kernels.FILTER: "int_mm",
                                                                          kernels.FILTER_WIDE: "float32"}
    assert kernels.parse_override("filter_wide=float32") == {kernels.FILTER_WIDE: "float32"}
    monkeypatch.setenv(kernels.ENV_VAR, "filter=int_mm,filter_wide=float32")
    table = extreme_table(400, 64, 2)
    filters = FilterDots(table, row_norms(table), torch.arange(1, 21), 1024)
    assert filters.product(1).kernel.name == "int_mm" and filters.product(WIDE_FROM - 1).kernel.name == "int_mm"
    assert filters.product(WIDE_FROM).kernel.name == "float32" and filters.product(20).dot_dtype == torch.float32
    wide = kernels.choose(kernels.FILTER_WIDE, 64)
    assert wide.forced and wide.op == kernels.FILTER_WIDE and "filter_wide" in wide.describe()


def test_a_damaged_cached_library_is_rebuilt_or_refused_never_loaded(tmp_path):
    """A cached .so that is not a whole ELF file (garbage, a truncated copy, empty) is built anew; one without
    the kernel's symbol is refused with the reason. Each in a fresh process (dlopen caches by path, and a
    truncated library can crash the process that maps it)."""
    cache = tmp_path / "cache"
    env = {**os.environ, native.CACHE_ENV: str(cache)}
    probe = "from model.gsu import native; print(native.library() is not None, native.unavailable_reason())"
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    if not first.stdout.startswith("True"):
        pytest.skip(f"the native kernel does not build here: {first.stdout}{first.stderr}")
    (built,) = cache.glob("muse_gsu_*.so")
    whole = built.read_bytes()
    for damage in ("garbage", "truncated", "empty", "foreign"):
        if damage == "foreign":
            source = tmp_path / "foreign.c"
            source.write_text("int foreign(void) { return 1; }\n")
            compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            subprocess.run([compiler, "-shared", "-fPIC", "-o", str(built), str(source)], check=True, timeout=120)
        else:
            built.write_bytes({"garbage": os.urandom(1000), "truncated": whole[:3000], "empty": b""}[damage])
        again = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, (damage, again.stderr)
        if damage == "foreign":
            assert again.stdout.startswith("False") and "undefined symbol" in again.stdout
        else:
            assert again.stdout.startswith("True"), damage
            assert native._intact(str(built)) and built.stat().st_size > 3000  # rebuilt whole


def test_cc_with_arguments_builds_the_native_kernel(monkeypatch, tmp_path):
    """CC is a command line, as make and the autotools take it (``ccache gcc``, ``gcc -O2``), not one path."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(native, "LIBRARY", native.LIBRARY.fresh())
    monkeypatch.setenv("CC", f"{compiler} -O1")
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    assert native.library() is not None, native.unavailable_reason()


def test_a_named_cache_that_cannot_be_used_is_said_not_replaced(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(native, "LIBRARY", native.LIBRARY.fresh())
    monkeypatch.setenv(native.CACHE_ENV, str(blocker))
    assert native.library() is None
    assert native.unavailable_reason() == f"{native.CACHE_ENV}={blocker}: not a writable directory"


def test_a_library_loads_once_and_says_why_when_it_cannot(monkeypatch, tmp_path):
    """cbuild.Library: the serving kernels' loader (model.dice_native, model.gsu.dense_select) builds on first use,
    returns the same function after, and without a compiler gives None and the reason instead of raising."""
    from model import dice_native
    from model.gsu import cbuild

    import shutil

    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this host")
    monkeypatch.setenv(cbuild.CACHE_ENV, str(tmp_path))
    built = cbuild.Library("muse_dice", dice_native.SOURCE, dice_native._SIGNATURES)
    first = built.function("muse_dice_")
    assert first is not None and built.function("muse_dice_") is first and built.reason() == ""
    assert any(name.startswith("muse_dice_") for name in os.listdir(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    missing = cbuild.Library("muse_dice", dice_native.SOURCE, dice_native._SIGNATURES)
    assert missing.function("muse_dice_") is None and "no-such-cc" in missing.reason()
    absent = cbuild.Library.absent("test")
    assert absent.function("anything") is None and absent.reason() == "test"
    monkeypatch.delenv("CC")
    unwritable = tmp_path / "refuses"
    unwritable.mkdir()
    monkeypatch.setenv(cbuild.CACHE_ENV, str(unwritable))
    monkeypatch.setattr(cbuild.tempfile, "TemporaryDirectory", _refusing_directory)  # writable to os.access, yet refuses
    refused = cbuild.Library("muse_dice_refused", dice_native.SOURCE + "\n", dice_native._SIGNATURES)
    assert refused.function("muse_dice_") is None and "building in" in refused.reason()


def _refusing_directory(*args, **kwargs):
    raise PermissionError(1, "Operation not permitted")


def test_bench_kernels_reports_each_kernel_against_its_torch_ops(tmp_path):
    """`muse bench kernels` on a small table: a row per case, the dense top-K identical all three ways, the
    Dice and DIN differences within float32 rounding, the CPU capability recorded (no timing is asserted)."""
    import argparse
    import json

    from bench import kernels as bench_kernels

    out = tmp_path / "k.json"
    args = argparse.Namespace(items=3000, lengths=[300], candidates=70, pairs=500, repeats=1, seed=0, json=str(out))
    assert bench_kernels.run(args) == 0
    payload = json.loads(out.read_text())
    assert payload["cpu_capability"] == str(torch.backends.cpu.get_cpu_capability())
    rows = {row["kernel"]: row for row in payload["rows"]}
    dense = ("dense top-K: int32 dots + selection in C vs float32 mm + C selection",
             "dense top-K: float32 mm + C selection vs torch ops")
    esu = ("ESU by index (muse: sata+simtier)", "ESU by index (paper_muse: sata+simtier, projections)")
    tower, vocab = "tower: first Linear folded vs concatenated", "vocabulary: bucket index vs binary search"
    assert set(rows) == {*dense, *esu, "Dice (eval)", "DIN MLP (C) vs torch blocks", "DIN, shared keys", tower, vocab}
    assert all(rows[name]["check"] == "identical: yes" for name in (*dense, vocab))
    for name in ("Dice (eval)", "DIN MLP (C) vs torch blocks", "DIN, shared keys", *esu, tower):
        assert float(rows[name]["check"].split()[-1]) < 1e-5
        assert rows[name]["native_ms"] > 0 and rows[name]["torch_ms"] > 0
