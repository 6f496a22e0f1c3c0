"""Stored retrieval (``muse retrieve``): the stored path gives exactly the online path's batches, ranks write disjoint
parts equal to one process's result, and a retrieval of another dataset, spec or with a damaged array is refused."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from cli.main import main
from common.errors import DataError, UserError
from datapipes.histories import Chain, HistoryGather
from datapipes.prepared import PreparedDataset
from datapipes.reader import make_dataloader
from model.config import ModelConfig
from model.gsu import GsuStage
from model.gsu.table import MMTable
from retrieval.run import RetrieveConfig, _write_parts, rank_range, retrieve
from retrieval.stage import RetrievedStage
from retrieval.store import PartWriter, RetrievalSpec, find_retrieval, open_split


def _same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x.labels, y.labels)
        assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
        assert x.sequence_features.keys() == y.sequence_features.keys()
        for key in x.sequence_features.keys():
            assert torch.equal(x.sequence_features[key].values(), y.sequence_features[key].values()), key
            assert torch.equal(x.sequence_features[key].lengths(), y.sequence_features[key].lengths()), key
        assert torch.equal(x.recent_scores, y.recent_scores) and torch.equal(x.gsu_scores, y.gsu_scores)


@pytest.fixture(scope="module")
def dataset_copy(prepared_dataset, tmp_path_factory):
    """A copy of the prepared dataset that may receive retrievals (DATA/retrieval/...)."""
    root = tmp_path_factory.mktemp("retrieval") / "ds"
    shutil.copytree(prepared_dataset, root)
    return str(root)


@pytest.mark.parametrize("preset,max_seq_len", [("muse", None), ("sim_hard", None), ("muse", 40)])
def test_stored_batches_equal_the_online_gsu_batches(dataset_copy, preset, max_seq_len):
    model = ModelConfig.preset(preset, k=12)
    out, meta = retrieve(RetrieveConfig(data=dataset_copy, model=model, max_seq_len=max_seq_len, batch_size=100,
                                        num_workers=0))
    ds = PreparedDataset.open(dataset_copy)
    spec = RetrievalSpec.of(model, max_seq_len, ds)
    assert out == find_retrieval(ds, spec, "auto", ["train", "test"]) and meta["spec"]["k"] == 12
    for split, shuffle in (("train", True), ("test", False)):
        stored = RetrievedStage(ds.histories(split), open_split(out, split))
        online = Chain(HistoryGather(ds.histories(split), max_seq_len), GsuStage(model, MMTable.load(ds.root)))
        _same_batches(list(make_dataloader(ds.root, split, 0, 1, 64, transform=stored, seed=3, shuffle=shuffle)),
                      list(make_dataloader(ds.root, split, 0, 1, 64, transform=online, seed=3, shuffle=shuffle)))


def test_ranks_write_disjoint_parts_equal_to_one_process(dataset_copy, tmp_path):
    ds = PreparedDataset.open(dataset_copy)
    cfg = RetrieveConfig(data=dataset_copy, model=ModelConfig.preset("muse", k=8), splits=("test",), batch_size=50,
                         num_workers=0)
    spec = RetrievalSpec.of(cfg.model, None, ds)
    _write_parts(cfg, ds, spec, str(tmp_path / "one"), 0, 1)
    workers = dataclasses.replace(cfg, num_workers=2, batch_size=20)  # two workers interleave their batches
    for rank in range(3):
        _write_parts(workers if rank == 1 else cfg, ds, spec, str(tmp_path / "three"), rank, 3)
    rows = ds.split("test").rows
    ranges = [rank_range(rows, r, 3) for r in range(3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == rows and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(e - b for b, e in ranges) - min(e - b for b, e in ranges) <= 1
    for name in ("gsu_items", "gsu_cats", "gsu_lengths", "gsu_scores", "recent_scores"):
        whole = np.load(tmp_path / "one" / "test" / "part-00000" / f"{name}.npy")
        parts = np.concatenate([np.load(tmp_path / "three" / "test" / f"part-{r:05d}" / f"{name}.npy") for r in range(3)])
        np.testing.assert_array_equal(whole, parts)
    assert np.load(tmp_path / "one" / "test" / "part-00000" / "gsu_lengths.npy").max() == 8


def test_a_part_takes_batches_in_any_order_but_each_sample_once(tmp_path):
    spec = RetrievalSpec("multimodal", 2, 3, 10)
    writer = PartWriter(str(tmp_path / "p"), spec, 10, 16)
    values = lambda n: {name: np.ones((n,) + shape, dtype) for name, (dtype, shape) in spec.widths().items()}
    writer.write(np.array([13, 14, 15]), values(3))
    writer.write(np.array([10, 11]), values(2))
    with pytest.raises(RuntimeError, match="written twice"):
        writer.write(np.array([11, 12]), values(2))
    with pytest.raises(RuntimeError, match="outside"):
        writer.write(np.array([16]), values(1))
    with pytest.raises(RuntimeError, match="only 5 samples"):
        writer.close()
    writer.write(np.array([12]), values(1))
    writer.close()
    assert np.load(tmp_path / "p" / "gsu_lengths.npy").tolist() == [1] * 6


def test_only_a_matching_retrieval_is_used(dataset_copy):
    ds = PreparedDataset.open(dataset_copy)
    model = ModelConfig.preset("muse", k=12)
    retrieve(RetrieveConfig(data=dataset_copy, model=model, batch_size=100, num_workers=0, force=True))
    found = find_retrieval(ds, RetrievalSpec.of(model, None, ds), "auto", ["train", "test"])
    other_k = RetrievalSpec.of(ModelConfig.preset("muse", k=13), None, ds)
    assert find_retrieval(ds, other_k, "auto", ["train", "test"]) is None  # another K: online GSU
    with pytest.raises(DataError, match=r"retrieval\.json: spec: retrieved with k 12 \(run: 13\)"):
        find_retrieval(ds, other_k, found, ["train", "test"])
    din = RetrievalSpec.of(ModelConfig.preset("din"), None, ds)
    assert find_retrieval(ds, din, "auto", ["train"]) is None
    with pytest.raises(UserError, match="--retrieval .*gsu 'id'"):
        find_retrieval(ds, RetrievalSpec.of(ModelConfig.preset("sim_soft"), None, ds), found, ["train"])


def test_a_damaged_or_foreign_retrieval_is_refused_naming_the_file(dataset_copy, tmp_path):
    ds = PreparedDataset.open(dataset_copy)
    model = ModelConfig.preset("muse", k=12)
    out = str(tmp_path / "r")
    retrieve(RetrieveConfig(data=dataset_copy, model=model, out=out, batch_size=100, num_workers=0))
    spec = RetrievalSpec.of(model, None, ds)
    scores = os.path.join(out, "train", "part-00000", "gsu_scores.npy")
    data = open(scores, "rb").read()
    with open(scores, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(DataError, match="gsu_scores.npy: \\(file\\)"):
        find_retrieval(ds, spec, out, ["train", "test"])
    with open(scores, "wb") as f:
        f.write(data)
    meta_path = os.path.join(out, "retrieval.json")
    meta = json.load(open(meta_path))
    json.dump({**meta, "vocab_fingerprint": "0" * 64}, open(meta_path, "w"))
    with pytest.raises(DataError, match="retrieval.json: vocab_fingerprint"):
        find_retrieval(ds, spec, out, ["train", "test"])
    json.dump({**meta, "splits": {**meta["splits"], "test": {**meta["splits"]["test"], "rows": 3}}}, open(meta_path, "w"))
    with pytest.raises(DataError, match="retrieval.json: splits.test.rows"):
        find_retrieval(ds, spec, out, ["train", "test"])


def test_retrieve_command_errors_are_one_line(dataset_copy, tmp_path, capsys):
    assert main(["retrieve", "--data", dataset_copy, "--model", "din"]) == 2
    assert "reads no lifelong behavior" in capsys.readouterr().err
    assert main(["retrieve", "--data", str(tmp_path / "missing")]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
    out = str(tmp_path / "r")
    assert main(["retrieve", "--data", dataset_copy, "--k", "5", "--splits", "test", "--out", out, "--num-workers", "0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["retrieve", "--data", dataset_copy, "--k", "5", "--splits", "test", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]


@pytest.mark.slow
def test_two_torchrun_ranks_write_the_retrieval_one_process_writes(dataset_copy, tmp_path):
    """``muse retrieve --nproc-per-node 2`` (torchx, gloo): each rank its part, rank 0 the description, one rename."""
    args = ["retrieve", "--data", dataset_copy, "--k", "7", "--splits", "test", "--num-workers", "0"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--out", str(tmp_path / "two"), "--nproc-per-node", "2"]) == 0
    one, two = open_split(str(tmp_path / "one"), "test"), open_split(str(tmp_path / "two"), "test")
    assert len(one.parts) == 1 and len(two.parts) == 2
    index = np.arange(PreparedDataset.open(dataset_copy).split("test").rows)
    a, b = one.rows(index), two.rows(index)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
