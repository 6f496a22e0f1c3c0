"""The projection (MLP, raw width -> 128, unit-norm output), InfoNCE, and MoCo's momentum encoder and queue.

For a batch of positive pairs (a, b) the query encoder embeds both sides, the momentum (key) encoder embeds
them again without gradient; the loss is symmetric InfoNCE, each query against its partner's key (the positive)
and the queue (the negatives), and both sides' keys then enter the queue, oldest out.
"""

import copy
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from datapipes import schema as S


class Projection(nn.Module):
    """[B, D] standardized content -> [B, 128] unit vectors: Linear(D, hidden), ReLU, Linear(hidden, 128), L2 norm."""

    def __init__(self, width: int, hidden: int, out: int = S.MM_DIM):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of -log(exp(q.k / T) / (exp(q.k / T) + sum_j exp(q.n_j / T))).

    q, k: [B, d] (row i of k is the positive of row i of q); negatives: [Q, d]. Returns a scalar.
    """
    positive = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, q @ negatives.t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCo(nn.Module):
    """Query encoder, its momentum copy (never trained by gradient) and a FIFO queue of past keys.

    Buffers: ``queue`` [Q, 128] (unit rows, random at start), ``queue_ptr`` (next row to overwrite).
    """

    def __init__(self, encoder: Projection, queue: int, momentum: float, temperature: float, generator: torch.Generator):
        super().__init__()
        self.encoder = encoder
        self.momentum_encoder = copy.deepcopy(encoder)
        for p in self.momentum_encoder.parameters():
            p.requires_grad_(False)
        self.momentum, self.temperature = momentum, temperature
        out = encoder.net[-1].out_features
        self.register_buffer("queue", F.normalize(torch.randn(queue, out, generator=generator), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q for every parameter."""
        for pk, pq in zip(self.momentum_encoder.parameters(), self.encoder.parameters()):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` [B, 128] over the oldest rows (wrapping around); only the newest Q if B > Q."""
        size = self.queue.shape[0]
        keys = keys[-size:]
        rows = (self.queue_ptr + torch.arange(keys.shape[0])) % size
        self.queue[rows] = keys
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def loss(self, a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """a, b: [B, D] the two sides of B positive pairs. Returns (scalar loss, [2B, 128] keys to enqueue)."""
        qa, qb = self.encoder(a), self.encoder(b)
        with torch.no_grad():
            ka, kb = self.momentum_encoder(a), self.momentum_encoder(b)
        negatives = self.queue.clone()
        loss = 0.5 * (info_nce(qa, kb, negatives, self.temperature) + info_nce(qb, ka, negatives, self.temperature))
        return loss, torch.cat([ka, kb])
