"""The installable stack: locks, the venv's contents, and the muse console script."""

import importlib
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

from cli.bench import BENCHMARKS
from cli.main import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("==", 1) for line in lines)


def test_venv_holds_the_cpu_stack_and_no_cuda_wheels():
    assert md.version("torch") == "2.13.0+cpu"
    assert md.version("fbgemm_gpu-cpu") == "1.8.0"
    for name in ("torchrec", "torchx", "iopath", "numpy", "pytest", "pyarrow"):
        md.version(name)
    names = [d.metadata["Name"].lower() for d in md.distributions()]
    assert not [n for n in names if n.startswith("nvidia")]
    assert "fbgemm-gpu" not in names and "fbgemm_gpu" not in names


def test_installed_versions_match_the_cpu_lock():
    for name, version in _pins(ROOT / "requirements" / "cpu.lock").items():
        assert md.version(name) == version, name


def test_cuda_lock_differs_from_cpu_lock_only_in_torch_and_fbgemm():
    cpu, cuda = _pins(ROOT / "requirements" / "cpu.lock"), _pins(ROOT / "requirements" / "cuda.lock")
    assert cuda.pop("torch") == "2.13.0" and cpu.pop("torch") == "2.13.0+cpu"
    assert cuda.pop("fbgemm-gpu") == cpu.pop("fbgemm_gpu-cpu") == "1.8.0"
    assert cpu == cuda


def test_muse_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "cli.main", "--help"], capture_output=True, text=True, check=True).stdout
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_is_implemented(name):
    module = importlib.import_module(f"cli.{name}")
    assert callable(module.add_arguments) and callable(module.run)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_is_implemented(name):
    module = importlib.import_module(f"bench.{name}")
    assert callable(module.add_arguments) and callable(module.run)


def test_unknown_flag_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "cli.main", "plan", "--preset", "taobao-mm-p90", "--no-such-flag"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--no-such-flag" in proc.stderr and "Traceback" not in proc.stderr
