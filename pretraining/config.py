"""Options of ``muse pretrain`` (see ``cli/pretrain.py`` for their help)."""

import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional

from common.errors import UserError
from common.io import path_manager

METHODS = ("contrastive", "projection")
MISSING_CONTENT = ("error", "skip")
# Fields that change the trained table: a checkpoint is resumed only if they are the same.
TRAINING_FIELDS = ("method", "window", "max_pairs", "epochs", "steps", "batch_size", "lr", "hidden", "temperature",
                   "queue", "momentum", "seed", "id_column", "vector_column", "missing_content", "log_every")


@dataclass(frozen=True)
class PretrainConfig:
    """What to read, how to mine pairs and train, where to write.

    ``method``: ``contrastive`` (MLP + InfoNCE with a MoCo queue) or ``projection`` (the untrained baseline:
    a seeded Gaussian random projection of the centered content vectors to 128-d).
    """

    raw: str
    content: str
    out: str
    pairs: Optional[str] = None          # SCL pairs parquet (query_item, item); None: I2I pairs from the histories
    content_ids: Optional[str] = None    # ids .npy of a .npy content file (default: CONTENT with .ids.npy)
    id_column: str = "205"
    vector_column: str = "content"
    method: str = "contrastive"
    window: int = 5
    max_pairs: int = 1_000_000
    epochs: int = 2
    steps: Optional[int] = None
    batch_size: int = 256
    lr: float = 1e-3
    hidden: int = 512
    temperature: float = 0.5
    queue: int = 4096
    momentum: float = 0.99
    seed: int = 0
    missing_content: str = "error"
    checkpoint_every: int = 200
    log_every: int = 50
    checkpoint_dir: Optional[str] = None
    link_raw: bool = True
    force: bool = False

    def validate(self) -> None:
        """Flags first, then the inputs' existence and the output's absence: all before any work."""
        if self.method not in METHODS:
            raise UserError(f"--method: must be one of {METHODS}, got {self.method!r}")
        if self.missing_content not in MISSING_CONTENT:
            raise UserError(f"--missing-content: must be one of {MISSING_CONTENT}, got {self.missing_content!r}")
        for name in ("window", "max_pairs", "epochs", "batch_size", "hidden", "queue", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps: must be at least 1, got {self.steps}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name}: must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.momentum < 1.0:
            raise UserError(f"--momentum: must be in [0, 1), got {self.momentum}")
        if not path_manager.isdir(self.raw):
            raise UserError(f"--raw {self.raw}: not a directory")
        if not path_manager.isfile(self.content):
            raise UserError(f"--content {self.content}: file not found")
        if self.pairs is not None and not path_manager.isfile(self.pairs):
            raise UserError(f"--pairs {self.pairs}: file not found")
        if self.content_ids is not None and not path_manager.isfile(self.content_ids):
            raise UserError(f"--content-ids {self.content_ids}: file not found")
        out = os.path.abspath(self.out)
        if os.path.exists(out) and not self.force:
            raise UserError(f"--out {self.out}: already exists (choose a new directory or pass --force)")
        if os.path.realpath(out) == os.path.realpath(self.raw):
            raise UserError(f"--out {self.out}: must not be --raw (it would be replaced)")

    def resolved_checkpoint_dir(self) -> str:
        """Where the resumable state lives: ``--checkpoint-dir`` or ``OUT.ckpt`` beside the output."""
        return self.checkpoint_dir or os.path.abspath(self.out).rstrip(os.sep) + ".ckpt"

    def training_fields(self) -> Dict[str, object]:
        values = asdict(self)
        return {name: values[name] for name in TRAINING_FIELDS}
