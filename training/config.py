"""``TrainConfig``: everything that determines a training run, saved as ``RUN/config.json``.

A run directory belongs to one config. Starting a run in a directory whose ``config.json`` differs is
refused unless ``--resume`` is given (which continues the saved config) or another directory is chosen;
with the same config the run continues from its newest complete checkpoint (this is also how a worker
restarted by torchrun picks up where the job stopped).
"""

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Iterable, Optional, Tuple

from common.atomic import write_text_atomic
from common.errors import UserError
from common.io import path_manager
from model.config import ModelConfig, reject_unknown_fields
from model.tables import ID_SPACES
from sharding.constraints import parse_constraints

EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adam")
# Fields that may differ between the saved config and a resumed run without making it another run.
RESUMABLE_FIELDS = ("steps", "num_workers", "checkpoint_every", "keep_checkpoints", "log_every", "eval_batch_size",
                    "retrieval")


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    data:               prepared dataset directory (``muse prepare`` output).
    model:              the model (``ModelConfig``; ``ModelConfig.preset(name)`` for the named ones).
    batch_size:         samples per rank per step (the global batch is ``batch_size * world_size``).
    steps:              training steps; 0 = ``epochs`` full passes over the train split.
    epochs:             passes over the train split when ``steps`` is 0.
    max_seq_len:        history length L fed to the GSU (None = the dataset's ``max_seq_len``).
    dense_lr, weight_decay:  AdamW on the dense (non-embedding) parameters.
    embedding_optimizer, embedding_lr:  fused in-backward optimizer of the ID tables.
    seed:               seeds model init, data order and every RNG; CPU runs are deterministic.
    checkpoint_every:   steps between checkpoints (0 = only at the end).
    keep_checkpoints:   complete checkpoints kept (older ones are deleted).
    shard:              per-table planner constraints, ``TABLE=TYPE[,TYPE][:KERNEL]`` (see sharding.constraints);
                        tables not named are never data_parallel. A table allowed both data_parallel and
                        another type may be planned differently at another world size, and a checkpoint
                        is then not resumable there.
    num_workers:        DataLoader workers per rank (the GSU runs in them).
    group_users:        train batches keep each user's samples together (within each shuffle buffer), so the GSU
                        scores a user's history once for all of them; batches are then correlated by user.
    log_every:          steps between train-loss records in ``metrics.jsonl``.
    eval_batch_size:    samples per rank per evaluation batch.
    retrieval:          where the pipeline GSU's results come from: "auto" (a stored retrieval of ``muse retrieve``
                        under DATA/retrieval/ that matches the model's GSU, K, recent window and max_seq_len, else
                        the GSU online over the history store), "none" (always online) or a retrieval directory
                        (must match). Both paths give identical batches, so it may change on resume.
    """

    data: str
    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("muse"))
    batch_size: int = 256
    steps: int = 0
    epochs: int = 1
    max_seq_len: Optional[int] = None
    dense_lr: float = 1e-3
    weight_decay: float = 1e-5
    embedding_optimizer: str = "rowwise_adagrad"
    embedding_lr: float = 0.05
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    shard: Tuple[str, ...] = ()
    num_workers: int = 1
    log_every: int = 20
    eval_batch_size: int = 1024
    group_users: bool = False
    retrieval: str = "auto"

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "keep_checkpoints", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "checkpoint_every", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise UserError(f"--max-seq-len must be >= 1, got {self.max_seq_len}")
        for name in ("dense_lr", "embedding_lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        try:
            constraints = parse_constraints(self.shard)
        except ValueError as err:
            raise UserError(f"--shard: {err}") from None
        unknown = sorted(set(constraints) - set(ID_SPACES))
        if unknown:
            raise UserError(f"--shard: unknown table(s) {', '.join(unknown)}; tables are {', '.join(ID_SPACES)}")
        if not self.retrieval:
            raise UserError("--retrieval: must be auto, none or a retrieval directory, got an empty value")
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise UserError(f"--embedding-optimizer must be one of {', '.join(EMBEDDING_OPTIMIZERS)}, got {self.embedding_optimizer!r}")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict; ``from_dict`` inverts it."""
        out = asdict(self)
        out["model"] = self.model.to_dict()
        out["shard"] = list(self.shard)
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        reject_unknown_fields(cls, data)
        values = dict(data)
        values["model"] = ModelConfig.from_dict(values["model"])
        values["shard"] = tuple(values.get("shard", ()))
        return cls(**values)

    def differences(self, other: "TrainConfig") -> Tuple[str, ...]:
        """Names of the fields (outside ``RESUMABLE_FIELDS``) where ``self`` and ``other`` differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return tuple(k for k in mine if k not in RESUMABLE_FIELDS and mine[k] != theirs[k])


def check_device_support(config: TrainConfig, device_type: str) -> None:
    """UserError when ``config`` cannot train on ``device_type`` ("cpu" or "cuda"): fbgemm's fused CPU
    kernels implement row-wise Adagrad only."""
    if device_type == "cpu" and config.embedding_optimizer != "rowwise_adagrad":
        raise UserError(
            f"--embedding-optimizer {config.embedding_optimizer}: not supported on CPU (fbgemm's fused CPU kernels "
            "support rowwise_adagrad only); use a CUDA machine or --embedding-optimizer rowwise_adagrad"
        )


def config_path(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/config.json"


def load_config(run_dir: str) -> TrainConfig:
    """The config saved in ``run_dir``; UserError when the directory holds none or a damaged one."""
    path = config_path(run_dir)
    if not path_manager.exists(path):
        raise UserError(f"{path}: no such file (not a run directory)")
    try:
        with path_manager.open(path, "r") as f:
            return TrainConfig.from_dict(json.load(f))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a valid training config ({err})") from err


def save_config(run_dir: str, config: TrainConfig) -> None:
    """Write ``config.json`` atomically (temp file, then replace); a no-op when it already holds ``config``."""
    path = config_path(run_dir)
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True)
    if path_manager.exists(path):
        with path_manager.open(path, "r") as f:
            if f.read() == text:
                return
    write_text_atomic(path, text, flag="--run", make_parent=True)


def resolve_run_config(run_dir: str, config: TrainConfig, resume: bool, explicit: Iterable[str] = RESUMABLE_FIELDS) -> TrainConfig:
    """The config this run uses, given what ``run_dir`` already holds.

    - no config.json: ``config`` (written by the caller on rank 0).
    - same config (up to ``RESUMABLE_FIELDS``): ``config``; training continues from the newest checkpoint.
    - different config: ``--resume`` continues the saved one, taking from ``config`` only the
      resumable fields named in ``explicit`` (e.g. a larger ``steps`` given on the command line);
      without ``--resume``, UserError naming the differing fields.
    """
    if not path_manager.exists(config_path(run_dir)):
        return config
    saved = load_config(run_dir)
    diff = saved.differences(config)
    if not diff:
        return config
    if resume:
        return replace(saved, **{k: getattr(config, k) for k in RESUMABLE_FIELDS if k in set(explicit)})
    raise UserError(
        f"{config_path(run_dir)}: run directory holds a different config ({', '.join(diff)}); "
        "pass --resume to continue it or choose a new --run"
    )
