"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically, last K kept.

Layout: ``RUN/checkpoints/step-XXXXXXXX/`` holding
- the DCP files of the state dict given to ``save`` (model shards, fused + dense optimizer state);
  DCP reshards on load, so a checkpoint written by N ranks loads on M;
- ``rank-XXXXX.pt``: each rank's own small state (reader position, RNG states), ``torch.load``-able
  with ``weights_only=True``; only used when resuming at the same world size;
- ``meta.json``: step, world size and the caller's extra fields, written last.

A checkpoint is written into ``.step-XXXXXXXX.tmp`` and renamed once every rank has finished, so a
directory named ``step-XXXXXXXX`` with a ``meta.json`` is complete; anything else (a writer killed
mid-way) is never loaded and is deleted by the next save.
"""

import json
import re
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from common.errors import DataError
from common.io import path_manager

_STEP_DIR = re.compile(r"^step-(\d{8})$")
META = "meta.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: its directory, step and the metadata written with it."""

    path: str
    step: int
    meta: Dict[str, Any]

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])


def checkpoint_root(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/checkpoints"


def complete_checkpoints(run_dir: str) -> List[CheckpointInfo]:
    """Every complete checkpoint of ``run_dir``, oldest first."""
    root = checkpoint_root(run_dir)
    if not path_manager.isdir(root):
        return []
    found = []
    for name in path_manager.ls(root):
        match = _STEP_DIR.match(name)
        meta_path = f"{root}/{name}/{META}"
        if match and path_manager.exists(meta_path):
            with path_manager.open(meta_path, "r") as f:
                found.append(CheckpointInfo(f"{root}/{name}", int(match.group(1)), json.load(f)))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: str) -> Optional[CheckpointInfo]:
    """The newest complete checkpoint of ``run_dir``, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _rank_file(path: str, rank: int) -> str:
    return f"{path}/rank-{rank:05d}.pt"


class CheckpointManager:
    """Saves and loads the checkpoints of one run; every method is collective (all ranks call it)."""

    def __init__(self, run_dir: str, keep: int, rank: int, world_size: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.run_dir = run_dir
        self.root = checkpoint_root(run_dir)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size

    def save(self, step: int, state: Dict[str, Any], rank_state: Dict[str, Any], meta: Optional[Dict[str, Any]] = None) -> str:
        """Write checkpoint ``step``: ``state`` through DCP (sharded), ``rank_state`` per rank.

        Returns the final directory. Older checkpoints beyond ``keep`` and unfinished ones are removed.
        """
        final = f"{self.root}/step-{step:08d}"
        tmp = f"{self.root}/.step-{step:08d}.tmp"
        if self.rank == 0:
            for stale in (tmp, final):
                if path_manager.exists(stale):
                    _rmtree(stale)
            path_manager.mkdirs(tmp)
        dist.barrier()
        dcp.save(state, checkpoint_id=tmp)
        with path_manager.open(_rank_file(tmp, self.rank), "wb") as f:
            torch.save(rank_state, f)
        dist.barrier()
        if self.rank == 0:
            with path_manager.open(f"{tmp}/{META}", "w") as f:
                json.dump({"step": step, "world_size": self.world_size, **(meta or {})}, f, indent=2, sort_keys=True)
            path_manager.mv(tmp, final)
            self._prune()
        dist.barrier()
        return final

    def load(self, checkpoint: CheckpointInfo, state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Load ``checkpoint`` into ``state`` in place (DCP reshards to this job's layout).

        Returns this rank's own state when the checkpoint was written at this world size, else None
        (the caller then re-derives what it can, e.g. the data position from the step).
        """
        dcp.load(state, checkpoint_id=checkpoint.path)
        if checkpoint.world_size != self.world_size:
            return None
        with path_manager.open(_rank_file(checkpoint.path, self.rank), "rb") as f:
            return torch.load(f, weights_only=True)

    def _prune(self) -> None:
        for old in complete_checkpoints(self.run_dir)[: -self.keep]:
            _rmtree(old.path)
        for name in path_manager.ls(self.root):
            if name.startswith(".step-") and name.endswith(".tmp"):
                _rmtree(f"{self.root}/{name}")


def _rmtree(path: str) -> None:
    """Remove a directory tree (DCP writes to local or fsspec paths; iopath's ``rm`` removes one file)."""
    shutil.rmtree(path_manager.get_local_path(path))


def load_model_weights(checkpoint_path: str, model: torch.nn.Module) -> torch.nn.Module:
    """Load a training checkpoint's model weights into an unsharded ``MuseModel`` (one process, no
    process group needed): the full tables are assembled from the shards; only tensors are read and the
    optimizer state is skipped. Returns ``model``; DataError when the checkpoint does not fit it (e.g. a
    model or vocabulary other than the run's)."""
    from model.train_module import MuseTrain

    wrapper = MuseTrain(model)
    state = {"model": wrapper.state_dict()}
    try:
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=checkpoint_path)
    except (CheckpointException, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{checkpoint_path}: (checkpoint): cannot be loaded into this model: {first}") from None
    wrapper.load_state_dict(state["model"])
    return model
