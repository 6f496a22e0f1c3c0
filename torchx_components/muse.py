"""TorchX components for the muse jobs, built on ``torchx.components.dist.ddp``.

Each returns an AppDef running ``torchrun ... -m cli.main -- <command> ARGS`` on ``nnodes`` hosts with
``nproc_per_node`` ranks each (``j = nnodes x nproc_per_node``). The same component runs locally and on
any torchx scheduler; only ``--image`` (and the scheduler's own options) change::

    torchx run --scheduler local_cwd torchx_components/muse.py:train --nnodes 1 --nproc_per_node 2 \\
        -- --data runs/data/prepared --run runs/muse
    torchx run --scheduler kubernetes torchx_components/muse.py:train --image REGISTRY/muse:TAG \\
        --nnodes 4 --nproc_per_node 8 --gpu 8 -- --data s3://bucket/prepared --run s3://bucket/runs/muse

``train`` lets torchrun restart failed workers (``max_restarts``); the restarted ranks continue from
the run directory's newest complete checkpoint.
"""

import os
from typing import Dict, List, Optional

from torchx import specs
from torchx.components import dist

DEFAULT_IMAGE = "muse-torchrec:latest"
ENTRY_MODULE = "cli.main"


def _muse_app(
    command: str,
    args: List[str],
    nnodes: int,
    nproc_per_node: int,
    image: str,
    cpu: int,
    gpu: int,
    memMB: int,
    h: Optional[str],
    env: Optional[Dict[str, str]],
    max_restarts: int,
    max_retries: int,
    rdzv_port: int,
    mounts: Optional[List[str]],
) -> specs.AppDef:
    """``dist.ddp`` running ``muse <command> <args>`` with torchrun's ``--max_restarts``."""
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nnodes and nproc_per_node must be >= 1, got {nnodes} and {nproc_per_node}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    worker_env = {
        "OMP_NUM_THREADS": str(max(1, cpu // nproc_per_node)),
        "MUSE_VERBOSE": os.environ.get("MUSE_VERBOSE", "0"),
        **(env or {}),
    }
    # "--" ends torchrun's own options: without it torchrun's parser takes the script's "--run" for an
    # abbreviation of its "--run-path" (cli.main skips the "--").
    app = dist.ddp(
        "--",
        command,
        *args,
        m=ENTRY_MODULE,
        image=image,
        name=f"muse-{command}",
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=worker_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
        tee=0,
    )
    role = app.roles[0]
    shell, cmd = role.args
    if not cmd.startswith("torchrun "):
        raise RuntimeError(f"unexpected dist.ddp command: {cmd!r}")
    role.args = [shell, f"torchrun --max_restarts {max_restarts} {cmd[len('torchrun '):]}"]
    return app


def train(
    *args: str,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_restarts: int = 3,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Train a MUSE-family model: ``muse train ARGS`` on every rank (SPMD).

    Args:
        args: arguments of ``muse train`` (e.g. --data DIR --run DIR --model muse)
        nnodes: number of hosts
        nproc_per_node: ranks per host
        image: container image (ignored by local_cwd)
        cpu: cpus per host
        gpu: gpus per host
        memMB: memory per host in MB
        h: a registered named resource (overrides cpu, gpu, memMB)
        env: extra environment variables (e.g. ENV1=v1,ENV2=v2)
        max_restarts: torchrun restarts of the worker group after a worker dies
        max_retries: scheduler-level retries of a whole host
        rdzv_port: rendezvous port on rank 0's host (multi-host only)
        mounts: mounts into the container (type=bind,src=/host,dst=/job)
    """
    return _muse_app("train", list(args), nnodes, nproc_per_node, image, cpu, gpu, memMB, h, env, max_restarts, max_retries, rdzv_port, mounts)


def evaluate(
    *args: str,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Evaluate a run's newest checkpoint on the test split: ``muse evaluate ARGS`` (e.g. --run DIR).

    Args:
        args: arguments of ``muse evaluate``
        nnodes: number of hosts
        nproc_per_node: ranks per host
        image: container image (ignored by local_cwd)
        cpu: cpus per host
        gpu: gpus per host
        memMB: memory per host in MB
        h: a registered named resource (overrides cpu, gpu, memMB)
        env: extra environment variables
        max_restarts: torchrun restarts after a worker dies
        rdzv_port: rendezvous port on rank 0's host (multi-host only)
        mounts: mounts into the container
    """
    return _muse_app("evaluate", list(args), nnodes, nproc_per_node, image, cpu, gpu, memMB, h, env, max_restarts, 0, rdzv_port, mounts)


def retrieve(
    *args: str,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Store a model's pipeline GSU results for a dataset: ``muse retrieve ARGS`` on every rank, each rank on a
    disjoint, contiguous range of every split (e.g. --data DIR --model muse). No restarts: a failed job leaves
    nothing and is run again.

    Args:
        args: arguments of ``muse retrieve``
        nnodes: number of hosts
        nproc_per_node: ranks per host
        image: container image (ignored by local_cwd)
        cpu: cpus per host
        gpu: gpus per host
        memMB: memory per host in MB
        h: a registered named resource (overrides cpu, gpu, memMB)
        env: extra environment variables
        rdzv_port: rendezvous port on rank 0's host (multi-host only)
        mounts: mounts into the container
    """
    return _muse_app("retrieve", list(args), nnodes, nproc_per_node, image, cpu, gpu, memMB, h, env, 0, 0, rdzv_port, mounts)


def export(
    *args: str,
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Write a torch.package inference model from a run: ``muse export ARGS`` (one process).

    Args:
        args: arguments of ``muse export`` (e.g. --run DIR --out model.pt)
        image: container image (ignored by local_cwd)
        cpu: cpus
        memMB: memory in MB
        h: a registered named resource (overrides cpu, memMB)
        env: extra environment variables
        mounts: mounts into the container
    """
    return _muse_app("export", list(args), 1, 1, image, cpu, 0, memMB, h, env, 0, 0, 29500, mounts)


def plan(
    *args: str,
    image: str = DEFAULT_IMAGE,
    cpu: int = 1,
    memMB: int = 4096,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Offline embedding capacity plan: ``muse plan ARGS`` (one process, no training ranks).

    Args:
        args: arguments of ``muse plan`` (e.g. --preset taobao-mm-p90 --nnodes 4 --nproc-per-node 8)
        image: container image (ignored by local_cwd)
        cpu: cpus
        memMB: memory in MB
        h: a registered named resource (overrides cpu, memMB)
        env: extra environment variables
        mounts: mounts into the container
    """
    return _muse_app("plan", list(args), 1, 1, image, cpu, 0, memMB, h, env, 0, 0, 29500, mounts)
