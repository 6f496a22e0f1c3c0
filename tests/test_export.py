"""End to end: a real 2-rank training run, ``muse export``, and the package loaded with ``python -I`` from an
empty folder where this project cannot be imported, scoring the test split exactly as the sharded
training model does (DistributedModelParallel with the run's checkpoint)."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

from cli.main import main

VENV_BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_PACKAGES = ("model", "inference", "datapipes", "common", "capacity", "training", "sharding", "cli", "bench")

# The sharded training model (2 ranks, as trained) on the test split: every rank scores every row (so the
# ranks' collectives match); rank 0 saves the probabilities and the same rows in raw hashed ids.
TRAINING_MODEL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from datapipes.prepared import PreparedDataset
    from datapipes.histories import HistoryGather
    from datapipes.reader import make_dataloader
    from inference.predict import RawIds
    from training.checkpoint import CheckpointManager, latest_checkpoint
    from training.config import load_config
    from training.data import gsu_stage
    from training.distributed import init_distributed, shutdown
    from training.sharded_model import build_sharded_model

    run, out = sys.argv[1:3]
    env = init_distributed()
    config = load_config(run)
    dataset = PreparedDataset.open(config.data)
    model = build_sharded_model(config, env, dataset.metadata.vocab_sizes)
    model.optimizer.init_state()
    state = model.checkpoint_state()
    CheckpointManager(run, config.keep_checkpoints, env.rank, env.world_size).load(latest_checkpoint(run), state)
    model.load_checkpoint_state(state)
    model.dmp.eval()
    stage, ids = gsu_stage(config, dataset), RawIds(dataset)
    probs, rows = [], []
    gather = HistoryGather(dataset.histories("test"), config.max_seq_len)
    loader = make_dataloader(config.data, "test", 0, 1, 97, transform=gather, num_workers=0, shuffle=False,
                             max_seq_len=config.max_seq_len, drop_last=False, drop_remainder=False)
    with torch.no_grad():
        for raw in loader:
            _, (_, logits, _) = model.dmp(stage(raw))
            probs.append(torch.sigmoid(logits))
            rows.append({"user_id": ids("user", raw.user_id),
                         "profile": torch.stack([ids(f"profile_{i + 1}", raw.profile[:, i]) for i in range(5)], 1),
                         "target_item": ids("item", raw.target_item), "target_cat": ids("category", raw.target_cat),
                         "item_city": ids("item_city", raw.item_city), "item_province": ids("item_province", raw.item_province),
                         "history_items": ids("item", raw.history_items), "history_cats": ids("category", raw.history_cats)})
    if env.rank == 0:
        torch.save({"probs": torch.cat(probs), "rows": rows}, out)
    shutdown()
""")

# Run with ``python -I -S`` in an empty folder: only site-packages is added (no .pth files, so no editable
# install of this project); the package is the only source of the model code.
FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    site_packages, package, rows_path, out = sys.argv[1:5]
    sys.path.append(site_packages)
    blocked = [m for m in {project} if importlib.util.find_spec(m) is not None]
    if blocked:
        raise SystemExit(f"project packages importable: {{blocked}}")
    import torch
    importer = torch.package.PackageImporter(package)
    predictor = importer.import_module("inference.predictor").load(importer)
    rows = torch.load(rows_path, weights_only=True)["rows"]
    probs = torch.cat([predictor.score(**row) for row in rows])
    files = sorted({{getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}})
    torch.save({{"probs": probs, "files": [f for f in files if f.startswith(site_packages)]}}, out)
""").format(project=repr(PROJECT_PACKAGES))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    return env


def _serving_distributions():
    """torch, torchrec, fbgemm_gpu, numpy and everything they require (extras excluded)."""
    seen, stack = set(), ["torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "numpy"]
    while stack:
        name = stack.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in requires:
            spec, _, marker = req.partition(";")
            if "extra" not in marker:
                stack.append(re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0])
    return seen


@pytest.fixture(scope="module")
def trained_run(prepared_dataset, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("train") / "run")
    cmd = [os.path.join(VENV_BIN, "muse"), "train", "--data", prepared_dataset, "--model", "muse", "--run", run,
           "--steps", "12", "--batch-size", "64", "--nproc-per-node", "2", "--checkpoint-every", "6"]
    done = subprocess.run(cmd, cwd=str(tmp_path_factory.mktemp("cwd")), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return run


@pytest.mark.slow
def test_exported_package_in_a_fresh_process_equals_the_training_model(trained_run, tmp_path):
    package = str(tmp_path / "model.pt")
    assert main(["export", "--run", trained_run, "--out", package]) == 0
    manifest_step = json.loads(open(os.path.join(trained_run, "checkpoints", "step-00000012", "meta.json")).read())["step"]
    assert manifest_step == 12

    reference = str(tmp_path / "training.pt")
    script = tmp_path / "training_model.py"
    script.write_text(TRAINING_MODEL_SCRIPT)
    done = subprocess.run([os.path.join(VENV_BIN, "torchrun"), "--standalone", "--nproc-per-node", "2", str(script),
                           trained_run, reference], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    empty = tmp_path / "empty"
    empty.mkdir()
    scored = str(tmp_path / "fresh.pt")
    site_packages = sysconfig.get_paths()["purelib"]
    done = subprocess.run([sys.executable, "-I", "-S", "-c", FRESH_PROCESS_SCRIPT, site_packages, package, reference, scored],
                          cwd=str(empty), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert os.listdir(empty) == []

    expected = torch.load(reference, weights_only=True)["probs"]
    fresh = torch.load(scored, weights_only=True)
    assert fresh["probs"].shape == expected.shape and expected.numel() > 0
    assert float((fresh["probs"] - expected).abs().max()) <= 1e-5

    owners = importlib.metadata.packages_distributions()
    allowed = _serving_distributions()
    used = set()
    for path in fresh["files"]:
        top = os.path.relpath(path, site_packages).split(os.sep)[0].removesuffix(".py")
        used.update(d.lower().replace("_", "-") for d in owners.get(top.split(".")[0], [top]))
    assert "torchrec" in used and "torch" in used
    assert used <= allowed, sorted(used - allowed)
