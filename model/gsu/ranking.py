"""The running top-k of ``cosine_topk``: per-sample int64 rank keys and the candidates merged into them.

A key is ``(order-preserving score bits << 32) | position``, so one integer comparison orders by score and,
among equal scores, ranks the larger (more recent) position first, deterministically.
"""

import math
import struct
from typing import List, Tuple

import torch

from model.gsu.cosine import cosines
from model.gsu.table import RowNorms

NO_KEY = torch.iinfo(torch.int64).min  # an empty slot


class RunningTopK:
    """Per-sample top-k as int64 keys; NO_KEY = empty slot. tau[b] is the score of sample b's k-th key (-inf
    until it has k). keys: int64 [B, k]."""

    def __init__(self, batch: int, k: int):
        self.k = k
        self.keys = torch.full((batch, k), NO_KEY, dtype=torch.int64)
        self.tau = [-math.inf] * batch

    def merge(self, samples: List[int], columns: torch.Tensor, keys: torch.Tensor) -> None:
        """Merge candidate ``keys`` [m] of block columns ``columns`` [m] (ascending; column j = samples[j])."""
        if len(samples) == 1:
            merged = torch.topk(torch.cat([self.keys[samples[0]], keys]), self.k, sorted=False).values[None, :]
            self.keys[samples[0]] = merged[0]
        else:
            index = torch.tensor(samples)
            g = len(samples)
            counts = torch.bincount(columns, minlength=g)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(keys.shape[0]) - starts.index_select(0, columns)
            pending = torch.full((g, int(counts.max())), NO_KEY, dtype=torch.int64)
            pending[columns, rank] = keys
            merged = torch.topk(torch.cat([self.keys.index_select(0, index), pending], 1), self.k, dim=1, sorted=False).values
            self.keys[index] = merged
        for sample, kth in zip(samples, merged.min(1).values.tolist()):
            self.tau[sample] = -math.inf if kth == NO_KEY else key_score(kth)

    def result(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores float32 [B, k], positions int64 [B, k], valid bool [B, k]), best first, empty slots last."""
        return sorted_result(torch.sort(self.keys, dim=1, descending=True).values)


def sorted_result(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``RunningTopK.result`` of rank keys int64 [B, k] already sorted descending (NO_KEY = empty, last)."""
    valid = keys != NO_KEY
    ordered = (keys >> 32).to(torch.int32)
    scores = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    scores = torch.where(valid, scores, torch.zeros((), dtype=torch.float32))
    positions = torch.where(valid, keys & 0xFFFFFFFF, torch.zeros((), dtype=torch.int64))
    return scores, positions, valid


def rank_keys(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering by score (float32, no NaN, no -0.0) then position, both descending: the float's bits
    with the magnitude flipped for negatives (an order-preserving int32) in the high word, position low."""
    bits = scores.view(torch.int32).to(torch.int64)
    return ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) << 32) | positions


def key_score(key: int) -> float:
    """The float32 score packed in a rank key."""
    ordered = key >> 32
    return struct.unpack("<f", struct.pack("<i", ordered ^ 0x7FFFFFFF if ordered < 0 else ordered))[0]


class Candidates:
    """Candidates of one piece, collected block by block and merged once: per segment (a sample with
    candidates) its sample index; per candidate its segment, position in L, table row and exact dot (float64)."""

    def __init__(self) -> None:
        self.samples: List[int] = []
        self.parts: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.size = 0

    def add(self, samples: List[int], columns: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor,
            dots: torch.Tensor) -> None:
        """columns [m] ascending in [0, len(samples)); positions, ids int64 [m]; dots float64 [m]."""
        self.parts.append((columns + len(self.samples), positions, ids, dots))
        self.samples.extend(samples)
        self.size += int(columns.shape[0])

    def merge_into(self, norms: RowNorms, sq_targets: torch.Tensor, state: RunningTopK) -> None:
        """Score the candidates (sq_targets: float64 [B] squared target norms) and merge them into ``state``."""
        if not self.parts:
            return
        columns, positions, ids, dots = (torch.cat(x) if len(self.parts) > 1 else x[0] for x in zip(*self.parts))
        sample_of = torch.tensor(self.samples).index_select(0, columns)
        scores = cosines(dots, norms.sq_norm.index_select(0, ids), sq_targets.index_select(0, sample_of))
        state.merge(self.samples, columns, rank_keys(scores, positions))
