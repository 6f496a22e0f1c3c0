"""PQ codes on disk and through the project: ``muse pq`` / ``prepare --pq`` output and errors, the GSU stage
reading the codes beside a prepared table, retrieval naming, export carrying the codes into the package's
predictor, ``muse plan`` counting them, and ``muse compare --pq``'s deltas."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from capacity.cluster import cluster_from_gib
from capacity.extras import row_norm_bytes
from capacity.plan import Workload, plan_capacity
from capacity.scale import preset
from cli.compare import protocol_models, with_pq_models
from cli.main import main
from common.errors import DataError, UserError
from datapipes.prepared import PreparedDataset
from inference.export import export_package
from inference.loader import load_predictor
from model.config import ModelConfig
from model.gsu import GsuStage, PQIndex, PQSettings
from model.gsu.pq import pq_dir
from model.gsu.table import MMTable
from quantize.codes import write_codes
from retrieval.store import RetrievalSpec
from training.report import pq_deltas

SMALL = PQSettings(m=16, sample_rows=1500, iterations=4, seed=0)


@pytest.fixture(scope="module")
def coded(prepared_dataset, tmp_path_factory) -> str:
    """A copy of the prepared dataset with PQ codes of 16 subspaces beside its table."""
    root = tmp_path_factory.mktemp("pq") / "ds"
    shutil.copytree(prepared_dataset, root)
    write_codes(str(root), SMALL, threads=1)
    return str(root)


def test_codes_are_written_beside_the_table_with_their_metadata(coded):
    out = pq_dir(coded, 16)
    assert sorted(os.listdir(out)) == ["codebooks.npy", "codes.npy", "pq.json"]
    meta = json.load(open(os.path.join(out, "pq.json")))
    dataset = PreparedDataset.open(coded)
    table = dataset.mm_table()
    assert meta["settings"] == {"m": 16, "centroids": 255, "sample_rows": 1500, "iterations": 4, "seed": 0}
    assert (meta["table_rows"], meta["table_dim"]) == table.shape
    assert meta["table_sha256"] == dataset.metadata.mm_table_sha256 and meta["sample_rows"] <= 1500
    index = PQIndex.open(out)
    again = PQIndex.build(torch.from_numpy(np.array(table)), SMALL)
    assert torch.equal(index.codes, again.codes) and torch.equal(index.codebooks, again.codebooks)
    assert index.codes.numel() * 8 == table.size  # 16 B per item against 128 B (plus 128 KB of codebooks)
    assert not [n for n in os.listdir(coded) if n.startswith(".")]  # no temporary directory left


def test_the_stage_reads_the_codes_beside_a_prepared_table_and_pickles_them_by_path(coded, prepared_dataset):
    cfg = ModelConfig.preset("muse_pq", k=10, pq_candidates=30)
    stage = GsuStage(cfg, MMTable.load(coded))
    assert stage.pq is not None and stage.pq.source == pq_dir(coded, 16)
    assert stage.pq.__reduce__()[1] == (pq_dir(coded, 16),)  # the codes travel by path, not by value
    assert torch.equal(pickle.loads(pickle.dumps(stage)).pq.codes, stage.pq.codes)
    with pytest.raises(UserError, match="muse pq --data"):
        GsuStage(cfg, MMTable.load(prepared_dataset))
    assert GsuStage(ModelConfig.preset("muse"), MMTable.load(prepared_dataset)).pq is None


def test_stale_or_damaged_codes_are_refused_naming_the_file(coded, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(coded, copy)
    meta_path = os.path.join(pq_dir(str(copy), 16), "pq.json")
    meta = json.load(open(meta_path))
    json.dump({**meta, "table_sha256": "0" * 64}, open(meta_path, "w"))
    with pytest.raises(DataError, match="table_sha256"):
        GsuStage(ModelConfig.preset("muse_pq"), MMTable.load(str(copy)))
    np.save(os.path.join(pq_dir(str(copy), 16), "codes.npy"), np.zeros((5, 16), dtype=np.uint8))
    with pytest.raises(DataError, match="codes.npy"):
        PQIndex.open(pq_dir(str(copy), 16), expected_rows=meta["table_rows"])


def test_pq_command_errors_are_one_line(coded, tmp_path, capsys):
    for argv, message in ((["pq", "--data", coded, "--m", "5"], "--m 5: must divide"),
                          (["pq", "--data", coded, "--m", "16"], "already exists"),
                          (["pq", "--data", str(tmp_path / "absent"), "--m", "16"], "not a prepared dataset"),
                          (["pq", "--data", coded, "--m", "8", "--centroids", "512"], "--centroids 512"),
                          (["prepare", "--raw", str(tmp_path), "--out", str(tmp_path / "o"), "--pq", "3"], "--m 3")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert not os.path.exists(tmp_path / "o")


def test_a_pq_retrieval_has_its_own_name():
    class Dataset:
        class metadata:
            max_seq_len = 120
    exact = RetrievalSpec.of(ModelConfig.preset("muse"), None, Dataset)
    approx = RetrievalSpec.of(ModelConfig.preset("muse_pq"), None, Dataset)
    assert approx.name == "multimodal-pq16c200-k50-s50-l120" and exact.name == "multimodal-k50-s50-l120"
    assert approx != exact and RetrievalSpec(**{k: v for k, v in exact.__dict__.items() if k != "pq"}) == exact


def test_plan_counts_the_code_table():
    cluster = cluster_from_gib(1, 8, 80, 1024, "cuda")
    exact = plan_capacity(Workload(ModelConfig.preset("muse")), preset("taobao-mm-p90"), cluster)
    approx = plan_capacity(Workload(ModelConfig.preset("muse_pq")), preset("taobao-mm-p90"), cluster)
    rows = exact.inputs["mm_rows"]
    assert exact.pq_code_bytes == 0 and approx.pq_code_bytes == rows * 16 + 256 * 128 * 4
    assert approx.mm_table_bytes == exact.mm_table_bytes == rows * 128
    host = next(r for r in approx.resources if r.name == "DDR host 0")
    assert host.parts["pq codes"] == approx.pq_code_bytes
    assert approx.to_dict()["pq_codes"]["bytes"] == approx.pq_code_bytes
    assert "PQ codes" in approx.to_text() and "PQ codes" not in exact.to_text()


def test_plan_reports_the_resident_gsu_bytes_both_ways():
    """The exact GSU keeps int8 rows and float32 row norms per item; the PQ scan reads codes + codebooks instead,
    and the PQ GSU keeps the rows and norms as well (targets, re-scoring)."""
    cluster = cluster_from_gib(1, 8, 80, 1024, "cuda")
    approx = plan_capacity(Workload(ModelConfig.preset("muse_pq")), preset("taobao-mm-p90"), cluster)
    rows = approx.inputs["mm_rows"]
    codes = rows * 16 + 256 * 128 * 4
    assert approx.norm_bytes == rows * 4
    resident = approx.gsu_resident()
    assert resident["exact"] == {"rows": rows * 128, "row_norms": rows * 4, "total": rows * 132}
    pq = resident["pq"]
    assert pq["total"] == rows * 132 + codes and pq["total_vs_exact"] > 1
    assert pq["scan_smaller_than_rows"] == rows * 128 / codes < 8 < pq["scan_smaller_than_rows_and_norms"] == rows * 132 / codes
    host = next(r for r in approx.resources if r.name == "DDR host 0")
    assert host.parts["gsu row norms"] == rows * 4 * 8  # one copy per rank, 8 ranks
    assert approx.to_dict()["gsu_resident"] == resident and "8.248x smaller than rows + norms" in approx.to_text()
    assert row_norm_bytes(10, "bf16") == 80 and row_norm_bytes(10, "int8") == 40


def test_export_carries_the_codes_to_the_predictor(coded, tmp_path):
    from tests.test_inference import make_run

    run = make_run(tmp_path, coded, "muse_pq")
    out = str(tmp_path / "model.pt")
    export_package(run, out)
    predictor = load_predictor(out)
    index = PQIndex.open(pq_dir(coded, 16))
    assert torch.equal(predictor.stage.pq.codes, index.codes) and torch.equal(predictor.stage.pq.codebooks, index.codebooks)
    assert predictor.manifest["pq"]["settings"]["m"] == 16 and "pq.codes" in predictor.manifest["blobs"]


def test_compare_adds_pq_variants_and_reports_deltas():
    assert not set(protocol_models("id")) & set(ModelConfig.PQ_PRESETS)
    assert with_pq_models(["muse", "din"]) == ["muse", "din", "muse_pq"]
    assert with_pq_models(["paper_muse"]) == ["paper_muse", "paper_muse_pq"]
    rows = [{"model": "muse", "gauc": 0.70, "gauc_unweighted": 0.69, "auc": 0.71},
            {"model": "muse_pq", "gauc": 0.69, "gauc_unweighted": None, "auc": 0.72}]
    (delta,) = pq_deltas(rows, ModelConfig.PQ_PRESETS)
    assert delta["exact"] == "muse" and delta["gauc_delta"] == pytest.approx(-0.01)
    assert delta["gauc_unweighted_delta"] is None and delta["auc_delta"] == pytest.approx(0.01)


def test_retrieve_stores_what_the_online_pq_gsu_selects(coded):
    from datapipes.histories import HistoryGather
    from datapipes.reader import make_dataloader
    from retrieval.run import RetrieveConfig, retrieve
    from retrieval.stage import RetrievedStage
    from retrieval.store import open_split

    model = ModelConfig.preset("muse_pq", k=12, pq_candidates=40)  # K' < L: the PQ path
    out, meta = retrieve(RetrieveConfig(data=coded, model=model, batch_size=100, num_workers=0, splits=("test",)))
    assert meta["spec"]["pq"] == "pq16c40" and "pq16c40" in out
    ds = PreparedDataset.open(coded)
    stage = GsuStage(model, MMTable.load(coded))
    stored = RetrievedStage(ds.histories("test"), open_split(out, "test"))
    online = HistoryGather(ds.histories("test"))
    a = list(make_dataloader(coded, "test", 0, 1, 64, transform=stored, shuffle=False))
    b = [stage(raw) for raw in make_dataloader(coded, "test", 0, 1, 64, transform=online, shuffle=False)]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x.gsu_scores, y.gsu_scores)
        assert torch.equal(x.sequence_features["gsu_item"].values(), y.sequence_features["gsu_item"].values())
