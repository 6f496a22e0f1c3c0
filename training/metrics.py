"""Evaluation metrics: exact GAUC by user (``training.gauc``), TorchRec's AUC, NE and CTR, and the run's metric log.

``EvalAccumulator`` keeps (user, logit, label) per rank. ``compute`` all-gathers them (one variable-size
all_gather over gloo) and runs the segmented GAUC pass on the whole split: ``gauc`` is the impression-weighted
mean of the users' AUCs (the paper's headline), ``gauc_unweighted`` the plain mean over users. AUC, NE and CTR
are TorchRec's metrics fed each rank's own samples; they reduce over ranks themselves.
"""

import json
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.ctr import CTRMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric
from torchrec.metrics.rec_metric import RecMetric

from common.io import path_manager
from training.gauc import distributed_gauc

_TASK = RecTaskInfo(name="ctr", label_name="label", prediction_name="prediction", weight_name="weight")
_METRICS = {"auc": AUCMetric, "ne": NEMetric, "ctr": CTRMetric}
# TorchRec's report key for each metric (AUC has only a window value; its window spans the whole split).
_REPORT_KEYS = {"auc": "auc-ctr|window_auc", "ne": "ne-ctr|lifetime_ne", "ctr": "ctr-ctr|lifetime_ctr"}


class EvalAccumulator:
    """Collects one rank's evaluation outputs; ``compute`` is collective and returns the global metrics."""

    def __init__(self) -> None:
        self._users: List[torch.Tensor] = []
        self._logits: List[torch.Tensor] = []
        self._labels: List[torch.Tensor] = []

    def add(self, user_ids: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """user_ids int64 [B], logits float32 [B], labels float32 [B] (1.0 = click)."""
        self._users.append(user_ids.detach().cpu().long())
        self._logits.append(logits.detach().float().cpu())
        self._labels.append(labels.detach().float().cpu())

    def compute(self) -> Dict[str, float]:
        """{"auc", "gauc", "gauc_unweighted", "gauc_users", "ne", "ctr", "samples"} over every rank's samples.

        GAUC ranks users' samples by logit (the model's exact order; a saturated sigmoid would add ties).
        """
        users, logits, labels = _cat(self._users, torch.long), _cat(self._logits, torch.float), _cat(self._labels, torch.float)
        group = _cpu_group()
        grouped = distributed_gauc(users, logits, labels, group)
        local_n = int(users.numel())
        total = torch.tensor([local_n], dtype=torch.int64)
        dist.all_reduce(total, group=group)
        out: Dict[str, float] = {"samples": float(total), "gauc": grouped.weighted,
                                 "gauc_unweighted": grouped.unweighted, "gauc_users": float(grouped.users)}
        largest = torch.tensor([max(local_n, 1)])
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
        batch, world = int(largest), dist.get_world_size()
        probs = torch.sigmoid(logits)
        for name, cls in _METRICS.items():
            metric: RecMetric = cls(
                world_size=world, my_rank=dist.get_rank(), batch_size=batch, tasks=[_TASK],
                window_size=batch * world, compute_on_all_ranks=True, process_group=group,
            )
            if local_n:
                metric.update(predictions={"ctr": probs}, labels={"ctr": labels}, weights={"ctr": torch.ones_like(probs)})
            out[name] = float(metric.compute()[_REPORT_KEYS[name]])
        return out


def _cat(parts: List[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


_GLOO_GROUPS: Dict[int, dist.ProcessGroup] = {}


def _cpu_group() -> Optional[dist.ProcessGroup]:
    """The process group for the CPU tensors of evaluation: the default one under gloo, else a gloo group
    over the same ranks (nccl cannot move CPU tensors), made once per process and reused by every evaluation.
    Collective the first time: every rank calls it."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _GLOO_GROUPS:
        _GLOO_GROUPS[key] = dist.new_group(backend="gloo")
    return _GLOO_GROUPS[key]


class MetricsLog:
    """Appends records to ``RUN/metrics.jsonl`` (rank 0 only) and to TensorBoard when it is installed."""

    def __init__(self, run_dir: str, rank: int) -> None:
        self.path = f"{run_dir.rstrip('/')}/metrics.jsonl"
        self.enabled = rank == 0
        self._tb = _tensorboard_writer(f"{run_dir.rstrip('/')}/tensorboard") if self.enabled else None

    def write(self, kind: str, step: int, values: Dict[str, float], **extra: Any) -> None:
        """One record ``{"kind", "step", "time", **values, **extra}``."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values, **extra}
        with path_manager.open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str, kind: Optional[str] = None) -> List[Dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl`` (of one ``kind`` if given), in order."""
    path = f"{run_dir.rstrip('/')}/metrics.jsonl"
    if not path_manager.exists(path):
        return []
    with path_manager.open(path, "r") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]


def _tensorboard_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=log_dir)
