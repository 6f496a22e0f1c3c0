"""The contrastive training loop: seeded, resumable, with a progress bar and a loss curve.

Step ``s`` trains on batch ``s mod E`` of epoch ``s // E`` (E = ceil(P / batch_size) steps per epoch) of the
pairs in the order of a permutation seeded by (seed, epoch), so a run resumed from a checkpoint sees the same
batches, and with the restored encoder, momentum encoder, queue and optimizer it computes the same parameters
as a run never stopped (same thread count).
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from pretraining.checkpoint import CheckpointDir
from pretraining.config import PretrainConfig
from pretraining.content import ContentTable
from pretraining.moco import MoCo, Projection


@dataclass
class TrainResult:
    encoder: Projection
    steps: int
    resumed_from: int                   # 0 for a fresh run
    losses: List[Tuple[int, float]]     # (step, mean loss of the steps since the previous record)


def schedule(num_pairs: int, cfg: PretrainConfig) -> Tuple[int, int]:
    """(steps per epoch, total steps)."""
    per_epoch = max(1, math.ceil(num_pairs / cfg.batch_size))
    return per_epoch, cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch


class PairBatches:
    """Batch of step ``s``: int64 [<= batch_size, 2] rows of ``pairs``."""

    def __init__(self, pairs: np.ndarray, batch_size: int, seed: int):
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.per_epoch = max(1, math.ceil(pairs.shape[0] / batch_size))
        self._epoch, self._order = -1, None

    def __call__(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, 1, epoch]).permutation(self.pairs.shape[0])
        return self.pairs[self._order[i * self.batch_size:(i + 1) * self.batch_size]]


def build(cfg: PretrainConfig, width: int) -> Tuple[MoCo, torch.optim.Optimizer]:
    """The seeded MoCo (encoder init from ``seed``, queue from ``seed + 1``) and its Adam optimizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = Projection(width, cfg.hidden)
    moco = MoCo(encoder, cfg.queue, cfg.momentum, cfg.temperature, torch.Generator().manual_seed(cfg.seed + 1))
    return moco, torch.optim.Adam(encoder.parameters(), lr=cfg.lr)


def train(cfg: PretrainConfig, content: ContentTable, pairs: np.ndarray, ckpt: CheckpointDir,
          on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Train to the configured step count, resuming from ``ckpt`` when it holds a state. ``on_step(step)`` runs
    after each step (after its checkpoint, if any)."""
    _, total = schedule(pairs.shape[0], cfg)
    moco, optimizer = build(cfg, content.width)
    batches = PairBatches(pairs, cfg.batch_size, cfg.seed)
    step, losses, acc_sum, acc_n = 0, [], 0.0, 0
    state = ckpt.load_state()
    if state is not None:
        moco.load_state_dict(state["moco"])
        optimizer.load_state_dict(state["optimizer"])
        step, acc_sum, acc_n = int(state["step"]), float(state["acc_sum"]), int(state["acc_n"])
        losses = [(int(s), float(v)) for s, v in state["losses"]]
    resumed_from = step
    bar = tqdm(total=total, initial=step, desc="pretrain", unit="step", disable=None, dynamic_ncols=True)
    try:
        while step < total:
            rows = batches(step)
            a = torch.from_numpy(content.standardized(rows[:, 0]))
            b = torch.from_numpy(content.standardized(rows[:, 1]))
            moco.momentum_update()
            loss, keys = moco.loss(a, b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            moco.enqueue(keys)
            step += 1
            acc_sum, acc_n = acc_sum + float(loss.detach()), acc_n + 1
            if step % cfg.log_every == 0 or step == total:
                losses.append((step, acc_sum / acc_n))
                acc_sum, acc_n = 0.0, 0
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == total:
                ckpt.save_state({"step": step, "moco": moco.state_dict(), "optimizer": optimizer.state_dict(),
                                 "losses": [list(x) for x in losses], "acc_sum": acc_sum, "acc_n": acc_n})
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
    return TrainResult(moco.encoder, step, resumed_from, losses)
