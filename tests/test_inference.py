"""The exported predictor: equal to the model it came from, rank == score, unknown ids, refusing damaged
packages, atomic writes. Uses a run directory in the trainer's layout (config.json, a DCP checkpoint
written in one process, metrics.jsonl); tests/test_export.py runs the real 2-rank training end to end."""

import json
import os
import shutil
import warnings
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp

from cli.main import main
from common.errors import DataError, UserError
from datapipes.batch import PROFILE_FIELDS
from datapipes.histories import HistoryGather
from datapipes.prepared import PreparedDataset
from datapipes.reader import make_dataloader
from inference import load_predictor
from inference.export import export_package
from inference.loader import verify_package
from inference.manifest import BLOB_PACKAGE, PackageIntegrityError
from inference.predict import RawIds, score_raw_batch
from model.config import ModelConfig
from model.gsu import GsuStage
from model.gsu.table import MMTable
from model.muse import build_model
from model.train_module import MuseTrain
from training.config import TrainConfig, save_config


def make_run(root, data_dir: str, preset, seed: int = 0) -> str:
    """A run directory as the trainer leaves it, with randomly initialised weights; preset: a preset name or a
    ``ModelConfig``."""
    model = preset if isinstance(preset, ModelConfig) else ModelConfig.preset(preset)
    run = os.path.join(str(root), f"run-{model.name}")
    config = TrainConfig(data=data_dir, model=model, batch_size=64, steps=5)
    save_config(run, config)
    torch.manual_seed(seed)
    vocab = PreparedDataset.open(data_dir).metadata.vocab_sizes
    wrapper = MuseTrain(build_model(config.model, vocab))
    with torch.no_grad():  # BatchNorm statistics away from their init, so the buffers matter
        for name, buf in wrapper.named_buffers():
            if buf.dtype.is_floating_point:
                buf.add_(torch.rand_like(buf))
    step_dir = os.path.join(run, "checkpoints", "step-00000005")
    with warnings.catch_warnings():  # "no process group: saving in a single process" is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": wrapper.state_dict()}, checkpoint_id=step_dir, no_dist=True)
    with open(os.path.join(step_dir, "meta.json"), "w") as f:
        json.dump({"step": 5, "world_size": 1}, f)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"kind": "eval", "step": 5, "auc": 0.5, "gauc": 0.5}) + "\n")
    return run


@pytest.fixture(scope="module")
def muse_package(prepared_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = make_run(root, prepared_dataset, "muse")
    out = str(root / "model.pt")
    export_package(run, out)
    return run, out


def _test_batches(data_dir: str, batch_size: int = 128):
    store = PreparedDataset.open(data_dir).histories("test")
    return make_dataloader(data_dir, "test", 0, 1, batch_size, transform=HistoryGather(store), num_workers=0, shuffle=False,
                           drop_last=False, drop_remainder=False)


def _reference_model(run: str, data_dir: str):
    """The checkpoint loaded the way the trainer would (DCP into the unsharded module), plus its GSU stage."""
    from inference.checkpoint import load_trained_model

    trained = load_trained_model(run)
    stage = GsuStage(trained.config.model, MMTable.load(data_dir))
    return trained.model, stage


def test_package_scores_equal_the_checkpointed_model(muse_package, prepared_dataset):
    run, path = muse_package
    predictor = load_predictor(path)
    model, stage = _reference_model(run, prepared_dataset)
    raw_ids = RawIds(PreparedDataset.open(prepared_dataset))
    worst = 0.0
    with torch.no_grad():
        for raw in _test_batches(prepared_dataset):
            expected = torch.sigmoid(model(stage(raw)))
            worst = max(worst, float((predictor.score_indices(raw) - expected).abs().max()))
            worst = max(worst, float((score_raw_batch(predictor, raw, raw_ids) - expected).abs().max()))
    assert worst <= 1e-6


def _user_history(data_dir: str):
    """Raw ids of one test user: (user_features, history items, history categories) of the longest history."""
    dataset = PreparedDataset.open(data_dir)
    raw_ids = RawIds(dataset)
    raw = next(iter(_test_batches(data_dir, 64)))
    row = int((raw.history_items != 0).sum(1).argmax())
    items = raw.history_items[row][raw.history_items[row] != 0]
    cats = raw.history_cats[row][raw.history_items[row] != 0]
    user = {"user_id": int(raw_ids("user", raw.user_id[row:row + 1])[0])}
    for i in range(5):
        user[f"profile_{i + 1}"] = int(raw_ids(f"profile_{i + 1}", raw.profile[row:row + 1, i])[0])
    return user, raw_ids("item", items), raw_ids("category", cats), raw_ids


@pytest.mark.parametrize("preset", ["muse", "paper_muse", "sim_hard", "din", "twin"])
def test_rank_equals_score_of_each_candidate(preset, prepared_dataset, tmp_path):
    run = make_run(tmp_path, prepared_dataset, preset, seed=1)
    out = str(tmp_path / "model.pt")
    export_package(run, out)
    predictor = load_predictor(out)
    user, items, cats, raw_ids = _user_history(prepared_dataset)
    # a history with an unknown item inside, and candidates: known items, an unknown id, the padding id
    items = torch.cat([items[:5], torch.tensor([123456789]), items[5:]])
    cats = torch.cat([cats[:5], cats[:1], cats[5:]])
    vocab_items = torch.arange(1, PreparedDataset.open(prepared_dataset).metadata.vocab_sizes["item"] + 1)
    candidates = torch.cat([raw_ids("item", vocab_items[torch.randperm(vocab_items.numel(), generator=torch.Generator().manual_seed(3))[:60]]),
                            torch.tensor([987654321, 0])])
    ranked = predictor.rank(user, items, cats, candidates)
    c = candidates.numel()
    profile = torch.tensor([[user[f"profile_{i}"] for i in range(1, 6)]]).expand(c, -1)
    cat, city, prov = predictor._item_attributes(predictor._map("item", candidates), None, None, None)
    scored = predictor.score(torch.full((c,), user["user_id"]), profile, candidates, items[None, :].expand(c, -1),
                             cats[None, :].expand(c, -1))
    assert ranked.shape == (c,)
    assert torch.allclose(ranked, scored, atol=1e-6, rtol=0)
    assert int((cat != 0).sum()) > 0 and int((city != 0).sum()) > 0 and int((prov != 0).sum()) > 0


def test_unknown_raw_ids_map_to_index_zero(muse_package):
    _, path = muse_package
    predictor = load_predictor(path)
    vocab = predictor.vocabs["item"]
    known = vocab.keys[:3]
    mapped = vocab.lookup(torch.cat([known, torch.tensor([0, 31337, -5])]))
    assert mapped[:3].tolist() == vocab.index[:3].tolist()
    assert mapped[3:].tolist() == [0, 0, 0]
    hist = torch.tensor([[0, 424242, 434343]])
    a = predictor.score([111], [[1, 2, 3, 4, 5]], [999], hist, hist)
    b = predictor.score([0], [[0, 0, 0, 0, 0]], [0], torch.zeros_like(hist), torch.zeros_like(hist))
    assert torch.equal(a, b)


def test_manifest_records_versions_checksums_and_metrics(muse_package):
    run, path = muse_package
    manifest = verify_package(path)
    assert manifest["versions"]["torch"] == torch.__version__
    assert "torchrec" in manifest["versions"]
    assert manifest["run"]["step"] == 5
    assert manifest["metrics"]["eval"][0]["gauc"] == 0.5
    blobs = manifest["blobs"]
    assert {"mm_table", "vocab.item.keys", "items.category"} <= set(blobs)
    assert any(name.startswith("weights.sequence_ec.") for name in blobs)
    mm = blobs["mm_table"]
    assert mm["dtype"] == "int8" and mm["bytes"] == mm["shape"][0] * mm["shape"][1]
    with zipfile.ZipFile(path) as archive:
        record = next(n for n in archive.namelist() if n.endswith("/muse/blobs/mm_table"))
        import hashlib
        assert hashlib.sha256(archive.read(record)).hexdigest() == mm["sha256"]


def _rewrite(src: str, dst: str, blob: str, change) -> None:
    """Copy the package zip, replacing one blob's bytes by ``change(bytes)`` (CRC kept valid: only sha256 can tell)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(f"/{BLOB_PACKAGE.replace('.', '/')}/{blob}"):
                data = change(data)
            zout.writestr(info, data)


def test_tampered_blob_is_refused(muse_package, tmp_path):
    _, path = muse_package
    bad = str(tmp_path / "tampered.pt")
    _rewrite(path, bad, "mm_table", lambda d: bytes([d[0] ^ 1]) + d[1:])
    with pytest.raises(DataError, match=r"blob mm_table: sha256 does not match"):
        load_predictor(bad)
    # the package's own entry (what a process without this project uses) refuses it too
    importer = torch.package.PackageImporter(bad)
    with pytest.raises(ValueError, match="sha256 does not match") as info:
        importer.import_module("inference.predictor").load(importer)
    assert type(info.value).__name__ == PackageIntegrityError.__name__


def test_flipped_byte_and_truncated_file_are_refused(muse_package, tmp_path):
    _, path = muse_package
    data = open(path, "rb").read()
    flipped = bytearray(data)
    manifest = verify_package(path)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/muse/blobs/mm_table"))
    name_len, extra_len = np.frombuffer(data[info.header_offset + 26: info.header_offset + 30], dtype="<u2")
    offset = info.header_offset + 30 + int(name_len) + int(extra_len) + 10  # a byte of the blob's data
    flipped[offset] ^= 0xFF
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="flipped.pt"):
        load_predictor(str(bad))
    short = tmp_path / "truncated.pt"
    short.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        load_predictor(str(short))
    assert manifest["blobs"]


def test_missing_package_and_export_errors(muse_package, tmp_path, capsys):
    run, _ = muse_package
    with pytest.raises(UserError, match="no such file"):
        load_predictor(str(tmp_path / "absent.pt"))
    assert main(["export", "--run", str(tmp_path / "no-run"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["export", "--run", run, "--out", str(tmp_path / "no-dir" / "m.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_failure_leaves_no_file(muse_package, tmp_path, monkeypatch):
    import inference.export as export_module

    run, _ = muse_package
    calls = {"n": 0}
    original = export_module.tensor_to_blob

    def failing(tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return original(tensor)

    monkeypatch.setattr(export_module, "tensor_to_blob", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_module.export_package(run, str(tmp_path / "model.pt"))
    assert os.listdir(tmp_path) == []


def test_predict_cli_writes_every_test_row(muse_package, prepared_dataset, tmp_path):
    _, path = muse_package
    out = tmp_path / "scores.parquet"
    assert main(["predict", "--package", path, "--data", prepared_dataset, "--out", str(out), "--batch-size", "100"]) == 0
    table = pq.read_table(str(out))
    rows = PreparedDataset.open(prepared_dataset).metadata.splits["test"].rows
    assert table.num_rows == rows
    assert table.column("row").to_pylist() == list(range(rows))
    scores = np.asarray(table.column("score"))
    assert np.all((scores > 0) & (scores < 1))
    assert sorted(os.listdir(tmp_path)) == ["scores.parquet"]


def test_bench_serve_reports_latency_percentiles(muse_package, prepared_dataset, tmp_path):
    import argparse

    import bench.serve as serve

    _, path = muse_package
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    out = tmp_path / "serve.json"
    args = parser.parse_args(["--package", path, "--data", prepared_dataset, "--candidates", "20", "--history", "100",
                              "--requests", "50", "--warmup", "1", "--json", str(out)])
    assert serve.run(args) == 0
    result = json.loads(out.read_text())
    assert result["requests"] == 50 and result["candidates"] == 20
    assert 0 < result["min_ms"] <= result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["history"] == 100 and result["users"] > 0
    with pytest.raises(UserError, match="--requests"):
        serve.run(parser.parse_args(["--package", path, "--requests", "10"]))


def test_rank_user_reads_the_exported_store_and_equals_rank_with_that_history(muse_package, prepared_dataset, tmp_path):
    run, _ = muse_package
    out = str(tmp_path / "served.pt")
    export_package(run, out, histories="test")
    predictor = load_predictor(out)  # <package>.histories beside it is attached
    dataset = PreparedDataset.open(prepared_dataset)
    raw_ids = RawIds(dataset)
    store = dataset.histories("test")
    user = int(np.argmax(store.offsets[:, 1] - store.offsets[:, 0]))
    items, cats = (torch.from_numpy(a.astype(np.int64)) for a in store.history(user))
    features = {"user_id": int(raw_ids("user", torch.tensor([user]))[0])}
    features.update({f: int(raw_ids(f, torch.tensor([int(store.profile[user, i])]))[0]) for i, f in enumerate(PROFILE_FIELDS)})
    candidates = raw_ids("item", torch.arange(1, 41))
    expected = predictor.rank(features, raw_ids("item", items), raw_ids("category", cats), candidates)
    assert torch.equal(predictor.rank_user(features["user_id"], candidates), expected)
    unknown = predictor.rank_user(424242424242, candidates)  # no such user: empty history, unknown profile
    assert unknown.shape == (40,) and torch.isfinite(unknown).all() and not torch.equal(unknown, expected)


def test_a_store_of_another_vocabulary_is_refused_by_the_predictor(muse_package, prepared_dataset, tmp_path):
    _, path = muse_package
    store = tmp_path / "store"
    shutil.copytree(os.path.join(prepared_dataset, "test", "histories"), store)
    meta = json.loads((store / "store.json").read_text())
    (store / "store.json").write_text(json.dumps({**meta, "vocab_fingerprint": "f" * 64}))
    with pytest.raises(DataError, match="store.json: vocab_fingerprint"):
        load_predictor(path, histories=str(store))
    with pytest.raises(ValueError, match="no history store attached"):
        load_predictor(path).rank_user(1, [1, 2])


def test_vocabulary_bucket_index_finds_what_the_binary_search_finds():
    """A 600K-key vocabulary takes the bucket index; its lookups equal a plain searchsorted on the same keys for
    known ids (first, last, bucket edges), unknown ones, 0, negatives and the int64 extremes. Keys too uneven for
    the step budget, or negative keys, keep the plain binary search (same answers)."""
    from inference.predictor import VocabTable

    gen = torch.Generator().manual_seed(5)
    keys = torch.unique(torch.randint(1, 2 ** 62, (600_000,), generator=gen))
    index = torch.randperm(keys.numel(), generator=gen) + 1
    table = VocabTable(keys, index)
    assert table._buckets is not None
    probes = torch.cat([keys[:5], keys[-5:], keys[torch.randint(0, keys.numel(), (5000,), generator=gen)],
                        torch.randint(-2 ** 62, 2 ** 62, (5000,), generator=gen), keys[:100] + 1, keys[-100:] - 1,
                        torch.tensor([0, -1, 2 ** 63 - 1, -2 ** 63])])

    def reference(ids):
        pos = torch.searchsorted(keys, ids).clamp_max(keys.numel() - 1)
        return torch.where((keys[pos] == ids) & (ids != 0), index[pos], torch.zeros((), dtype=torch.int64))

    assert torch.equal(table.lookup(probes), reference(probes))
    assert table.lookup(probes.view(2, -1)).shape == (2, probes.numel() // 2)
    crowded = torch.cat([torch.arange(1, 600_001), torch.tensor([2 ** 62])])  # one bucket holds nearly all keys
    negative = torch.cat([-keys[:300_000].flip(0), keys[:300_000]])
    for keys in (crowded, negative):
        index = torch.arange(1, keys.numel() + 1)
        table = VocabTable(keys, index)
        assert table._buckets is None
        probes = torch.cat([keys[::997], keys[::991] + 1, torch.tensor([0, -5])])
        assert torch.equal(table.lookup(probes), reference(probes))
