"""Damaged or mis-shaped raw files: one DataError line naming file and column; the CLI exits 2 and
leaves no output (nor temp directory) behind."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli.main import main
from common.errors import DataError
from datapipes import schema as S
from datapipes.prepare import PrepareConfig, prepare
from datapipes.synth import SynthConfig, synthesize


def _rewrite(path, fn):
    table = pq.read_table(path)
    pq.write_table(fn(table), path)


def _set_column(name, array_fn):
    def fn(table):
        i = table.schema.get_field_index(name)
        return table.set_column(i, name, array_fn(table.column(name).combine_chunks()))
    return fn


def _list_of(values_per_row, type_):
    return pa.array(values_per_row, type=pa.list_(type_))


def _first_row_changed(row_fn, type_):
    def fn(col):
        rows = col.to_pylist()
        rows[0] = row_fn(rows[0])
        return pa.array(rows, type=type_)
    return fn


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _garbage(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())


def _corrupt_column(name):
    """Keep header, footer and the other columns; scramble the bytes of column ``name``'s chunk."""
    def damage(path):
        chunk = pq.ParquetFile(path).metadata.row_group(0)
        col = next(chunk.column(i) for i in range(chunk.num_columns) if chunk.column(i).path_in_schema.startswith(name))
        start = col.dictionary_page_offset or col.data_page_offset
        data = bytearray(open(path, "rb").read())
        rng = np.random.default_rng(1)
        for pos in range(start, start + col.total_compressed_size, 3):
            data[pos] = int(rng.integers(0, 256))
        open(path, "wb").write(bytes(data))
    return damage


CASES = {
    "missing file": (S.TEST_USER_FEATURES, lambda p: os.remove(p), "(file)", "not found"),
    "missing column": (S.ITEM_FEATURES, lambda p: _rewrite(p, lambda t: t.drop_columns([S.PROVINCE])), S.PROVINCE, "missing"),
    "int32 user id": (S.TRAIN_SAMPLES, lambda p: _rewrite(p, _set_column(S.USER, lambda c: c.cast(pa.int32(), safe=False))), S.USER, "int32"),
    "int16 embedding": (S.SCL_EMBEDDINGS, lambda p: _rewrite(p, _set_column(S.EMBEDDING, lambda c: c.cast(pa.list_(pa.int16())))),
                        S.EMBEDDING, "int16"),
    "string history": (S.TRAIN_USER_FEATURES, lambda p: _rewrite(p, _set_column(S.HIST_ITEMS, lambda c: c.cast(pa.list_(pa.string())))),
                       S.HIST_ITEMS, "string"),
    "embedding of 127": (S.SCL_EMBEDDINGS, lambda p: _rewrite(p, _set_column(S.EMBEDDING, _first_row_changed(lambda r: r[:127], pa.list_(pa.int8())))),
                         S.EMBEDDING, "127"),
    "label of 3": (S.TEST_SAMPLES, lambda p: _rewrite(p, _set_column(S.LABEL, _first_row_changed(lambda r: r + [0], pa.list_(pa.int8())))),
                   S.LABEL, "expected 2"),
    "label not one-hot": (S.TRAIN_SAMPLES, lambda p: _rewrite(p, _set_column(S.LABEL, _first_row_changed(lambda r: [1, 1], pa.list_(pa.int8())))),
                          S.LABEL, "one-hot"),
    "null user id": (S.TRAIN_SAMPLES, lambda p: _rewrite(p, _set_column(S.USER, _first_row_changed(lambda r: None, pa.int64()))), S.USER, "null"),
    "null in history": (S.TEST_USER_FEATURES, lambda p: _rewrite(p, _set_column(S.HIST_ITEMS, _first_row_changed(lambda r: r[:-1] + [None], pa.list_(pa.int64())))),
                        S.HIST_ITEMS, "null"),
    "history lengths differ": (S.TRAIN_USER_FEATURES, lambda p: _rewrite(p, _set_column(S.HIST_CATS, _first_row_changed(lambda r: r[1:], pa.list_(pa.int64())))),
                               S.HIST_CATS, "entries"),
    "duplicate column": (S.ITEM_FEATURES, lambda p: _rewrite(p, lambda t: t.append_column(S.CATEGORY, t.column(S.CATEGORY))),
                         S.CATEGORY, "duplicate column"),
    "empty file": (S.ITEM_FEATURES, lambda p: _rewrite(p, lambda t: t.slice(0, 0)), "(file)", "empty"),
    "truncated": (S.TRAIN_USER_FEATURES, _truncate, "(file)", "parquet"),
    "not parquet": (S.SCL_EMBEDDINGS, _garbage, "(file)", "parquet"),
    "corrupt column": (S.TRAIN_USER_FEATURES, _corrupt_column(S.HIST_ITEMS), S.HIST_ITEMS, "corrupt"),
}


@pytest.fixture
def raw_copy(raw_dataset, tmp_path):
    path = tmp_path / "raw"
    shutil.copytree(raw_dataset, path)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_raw_file_gives_one_line_naming_file_and_column(raw_copy, tmp_path, case):
    filename, damage, column, words = CASES[case]
    damage(str(raw_copy / filename))
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare(PrepareConfig(raw=str(raw_copy), out=str(out)))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{raw_copy / filename}: {column}: "), message
    assert words in message, message
    assert not out.exists() and os.listdir(tmp_path) == ["raw"]


@pytest.mark.parametrize("case", ["embedding of 127", "missing file", "truncated"])
def test_cli_exits_2_with_one_line_and_no_output(raw_copy, tmp_path, capsys, case):
    filename, damage, column, _ = CASES[case]
    damage(str(raw_copy / filename))
    out = tmp_path / "prepared"
    assert main(["prepare", "--raw", str(raw_copy), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and filename in err and column in err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["raw"]


def test_cli_refuses_an_existing_output_and_bad_flags(raw_dataset, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["prepare", "--raw", raw_dataset, "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["prepare", "--raw", raw_dataset, "--out", str(tmp_path / "x"), "--item-coverage", "0"]) == 2
    assert "--item-coverage" in capsys.readouterr().err
    assert main(["prepare", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "--raw" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "z"), "--seq-len", "100001"]) == 2
    assert "--seq-len" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["exists"]


@pytest.mark.parametrize("out_of", [lambda raw: raw, lambda raw: raw.parent, lambda raw: raw / "sub" / ".." / ".."])
def test_cli_refuses_an_output_that_is_or_contains_the_raw_directory(raw_copy, capsys, out_of):
    before = sorted(os.listdir(raw_copy))
    out = out_of(raw_copy)
    assert main(["prepare", "--raw", str(raw_copy), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "--raw" in err, err
    assert sorted(os.listdir(raw_copy)) == before and len(before) == len(S.RAW_FILES)


def test_an_output_inside_the_raw_directory_is_allowed_and_spares_the_raw_files(raw_copy):
    before = sorted(os.listdir(raw_copy))
    out = raw_copy / "prepared"
    prepare(PrepareConfig(raw=str(raw_copy), out=str(out), buckets=1))
    prepare(PrepareConfig(raw=str(raw_copy), out=str(out), buckets=1, force=True))
    assert sorted(os.listdir(raw_copy)) == sorted(before + ["prepared"])
    assert (out / "metadata.json").exists()


def test_cli_refuses_an_output_that_is_a_file_and_keeps_it(raw_dataset, tmp_path, capsys):
    out = tmp_path / "afile"
    out.write_text("keep me")
    assert main(["prepare", "--raw", raw_dataset, "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}: is a file" in err, err
    assert out.read_text() == "keep me" and os.listdir(tmp_path) == ["afile"]


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_output_and_the_next_run_cleans_up(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    synthesize(SynthConfig(users=200, items=3000, samples=3000, seq_len=2000, seed=2), str(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "prepare", "--raw", str(raw), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not [p for p in os.listdir(tmp_path) if p.startswith(".prepared.tmp-")] and time.time() < deadline:
        assert proc.poll() is None, "prepare finished before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".prepared.tmp-")]
    assert main(["prepare", "--raw", str(raw), "--out", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["prepared", "raw"]
    assert (out / "metadata.json").exists()
