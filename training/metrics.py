"""Evaluation metrics from TorchRec (AUC, GAUC grouped by user, NE, CTR) and the run's metric log.

GAUC needs every sample of a user in one contiguous group, while the test split is spread over ranks
and batches. ``EvalAccumulator`` keeps (user, probability, label) per rank, sends each user's samples
to rank ``user % world_size`` (one all-to-all), sorts by user and feeds TorchRec's ``GAUCMetric`` the
group sizes as ``num_candidates``; the four metrics then reduce over ranks themselves.
"""

import json
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.ctr import CTRMetric
from torchrec.metrics.gauc import GAUCMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric
from torchrec.metrics.rec_metric import RecMetric

from common.io import path_manager

_TASK = RecTaskInfo(name="ctr", label_name="label", prediction_name="prediction", weight_name="weight")
_METRICS = {"auc": AUCMetric, "gauc": GAUCMetric, "ne": NEMetric, "ctr": CTRMetric}
# TorchRec's report key for each metric (AUC has only a window value; its window spans the whole split).
_REPORT_KEYS = {"auc": "auc-ctr|window_auc", "gauc": "gauc-ctr|lifetime_gauc", "ne": "ne-ctr|lifetime_ne", "ctr": "ctr-ctr|lifetime_ctr"}


class EvalAccumulator:
    """Collects one rank's evaluation outputs; ``compute`` is collective and returns the global metrics."""

    def __init__(self) -> None:
        self._users: List[torch.Tensor] = []
        self._probs: List[torch.Tensor] = []
        self._labels: List[torch.Tensor] = []

    def add(self, user_ids: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """user_ids int64 [B], logits float32 [B], labels float32 [B] (1.0 = click)."""
        self._users.append(user_ids.detach().cpu().long())
        self._probs.append(torch.sigmoid(logits.detach().float()).cpu())
        self._labels.append(labels.detach().float().cpu())

    def compute(self) -> Dict[str, float]:
        """{"auc", "gauc", "ne", "ctr", "gauc_users", "samples"} over every rank's samples."""
        users, probs, labels = _group_by_user(_cat(self._users, torch.long), _cat(self._probs, torch.float), _cat(self._labels, torch.float))
        order = torch.sort(users, stable=True).indices
        users, probs, labels = users[order], probs[order], labels[order]
        local_n = int(users.numel())
        world = dist.get_world_size()
        total = torch.tensor([local_n])
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        largest = torch.tensor([max(local_n, 1)])
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        batch = int(largest)
        out: Dict[str, float] = {"samples": float(total)}
        for name, cls in _METRICS.items():
            metric: RecMetric = cls(
                world_size=world, my_rank=dist.get_rank(), batch_size=batch, tasks=[_TASK],
                window_size=batch * world, compute_on_all_ranks=True,
            )
            if local_n:
                extra: Dict[str, Any] = {}
                if name == "gauc":
                    extra["num_candidates"] = torch.unique_consecutive(users, return_counts=True)[1]
                metric.update(predictions={"ctr": probs}, labels={"ctr": labels}, weights={"ctr": torch.ones_like(probs)}, **extra)
            report = metric.compute()
            out[name] = float(report[_REPORT_KEYS[name]])
            if name == "gauc":
                out["gauc_users"] = float(report["gauc-ctr|lifetime_gauc_num_samples"])
        return out


def _cat(parts: List[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def _group_by_user(users: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor):
    """All-to-all so that rank r holds every sample whose ``user % world_size == r``."""
    world = dist.get_world_size()
    if world == 1:
        return users, probs, labels
    dest = users % world
    order = torch.sort(dest, stable=True).indices
    users, probs, labels, dest = users[order], probs[order], labels[order], dest[order]
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    packed = torch.stack([users.double(), probs.double(), labels.double()], dim=1)
    received = packed.new_empty((sum(recv), 3))
    dist.all_to_all_single(received, packed, output_split_sizes=recv, input_split_sizes=send)
    return received[:, 0].long(), received[:, 1].float(), received[:, 2].float()


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
