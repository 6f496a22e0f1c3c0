"""The resumable state of one ``muse pretrain``, in its checkpoint directory (default ``OUT.ckpt``):

- ``meta.json``: the fingerprint of the inputs and training options, and the pair statistics;
- ``pairs.npy``: the mined pairs (int64 [P, 2] content rows), so a resumed run does not mine again;
- ``state.pt``: step, encoder, momentum encoder, queue, optimizer, loss curve (``torch.save``, read back with
  ``weights_only=True``).
Each file is written atomically (temp file, rename), so a kill leaves the previous complete state. A directory
holding another fingerprint is refused (one line); the directory is removed once the output is written.
"""

import json
import os
import shutil
from dataclasses import asdict
from typing import Optional, Tuple

import numpy as np
import torch

from common.atomic import atomic_file, local_target
from common.errors import UserError
from pretraining.pairs import PairStats

META, PAIRS, STATE = "meta.json", "pairs.npy", "state.pt"


class CheckpointDir:
    def __init__(self, path: str, fingerprint: str):
        self.path = local_target(path, "--checkpoint-dir")
        self.fingerprint = fingerprint

    def check(self) -> None:
        """UserError if the directory holds the state of another configuration or input."""
        meta = os.path.join(self.path, META)
        if not os.path.exists(meta):
            return
        try:
            with open(meta) as f:
                found = json.load(f).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            found = None
        if found != self.fingerprint:
            raise UserError(f"--checkpoint-dir {self.path}: holds the state of another pretraining (other inputs or "
                            f"options); remove it to start over, or run with the same inputs and options to resume")

    def load_pairs(self) -> Optional[Tuple[np.ndarray, PairStats]]:
        meta, pairs = os.path.join(self.path, META), os.path.join(self.path, PAIRS)
        if not (os.path.exists(meta) and os.path.exists(pairs)):
            return None
        with open(meta) as f:
            stats = PairStats(**json.load(f)["pairs"])
        return np.load(pairs, allow_pickle=False), stats

    def save_pairs(self, pairs: np.ndarray, stats: PairStats) -> None:
        os.makedirs(self.path, exist_ok=True)
        with atomic_file(os.path.join(self.path, PAIRS), "--checkpoint-dir") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, pairs)
        with atomic_file(os.path.join(self.path, META), "--checkpoint-dir") as tmp:
            with open(tmp, "w") as f:
                json.dump({"fingerprint": self.fingerprint, "pairs": asdict(stats)}, f, indent=1)

    def load_state(self) -> Optional[dict]:
        path = os.path.join(self.path, STATE)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return torch.load(f, weights_only=True)

    def save_state(self, state: dict) -> None:
        os.makedirs(self.path, exist_ok=True)
        with atomic_file(os.path.join(self.path, STATE), "--checkpoint-dir") as tmp:
            with open(tmp, "wb") as f:
                torch.save(state, f)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
