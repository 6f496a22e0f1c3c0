"""The over arch's input as blocks of columns, and its first Linear folded over them (serving's shared rank).

A rank scores one user's B candidates. Its tower input [B, in] (``OverArch``) holds columns of three kinds:

- ``Dense``: different in every row (the candidate's side features, target, DIN and SA-TA pools), [B, w];
- ``Shared``: the same in every row (the user's id and profile embeddings), [w];
- ``Tiers``: SimTier's features, log1p(count_t) * v_t per tier t, [B, T * d], given as their weights
  log1p(counts) [B, T] and the learned vectors v [T, d].

The first Linear y = x W^T + b over the concatenated columns equals, block by block,

    Dense:   x_blk W_blk^T                       (W_blk = W[:, block's columns], [H, w])
    Shared:  W_blk x_blk, once, added to the bias
    Tiers:   log1p(counts) M^T, with M[h, t] = sum_j W_blk[h, t * d + j] v[t, j]   ([H, T], taken per call: H T d)

so the rank multiplies [B, dense + T per SimTier] by [.., H] instead of [B, in] by [in, H] (on the MUSE preset:
168 columns instead of 544) and never builds SimTier's [B, T * d] features or the concatenated input. The sums run
in another order than the concatenated product's, so the result equals it to float32 rounding (tests: 1e-5 on
the logits). ``concatenated`` gives the [B, in] input itself, the same tensor ``OverArch.forward`` builds.
"""

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn


@dataclass(frozen=True)
class Dense:
    """Columns that differ per row: values [B, w]."""

    values: torch.Tensor

    @property
    def width(self) -> int:
        return self.values.shape[1]

    def expanded(self, rows: int) -> torch.Tensor:
        return self.values


@dataclass(frozen=True)
class Shared:
    """Columns that are the same in every row: values [w]."""

    values: torch.Tensor

    @property
    def width(self) -> int:
        return self.values.shape[0]

    def expanded(self, rows: int) -> torch.Tensor:
        return self.values[None, :].expand(rows, -1)


@dataclass(frozen=True)
class Tiers:
    """SimTier's columns: weights [B, T] (log1p of the tier counts) times vectors [T, d], flattened tier-major."""

    weights: torch.Tensor
    vectors: torch.Tensor

    @property
    def width(self) -> int:
        return self.vectors.numel()

    def expanded(self, rows: int) -> torch.Tensor:
        """[B, T * d]: SimTier's features, computed as ``SimTier.forward`` computes them."""
        return (self.weights.unsqueeze(-1) * self.vectors).flatten(1)


Block = Union[Dense, Shared, Tiers]


def concatenated(blocks: Sequence[Block], rows: int) -> torch.Tensor:
    """The [rows, sum of widths] input the blocks stand for."""
    return torch.cat([block.expanded(rows) for block in blocks], dim=1)


def _rows(block: Block) -> int:
    return block.weights.shape[0] if isinstance(block, Tiers) else block.values.shape[0]


def folded_linear(linear: nn.Linear, blocks: Sequence[Block], rows: int) -> torch.Tensor:
    """``linear(concatenated(blocks, rows))`` [rows, H], block by block (see the module docstring)."""
    weight = linear.weight
    hidden = weight.shape[0]
    if sum(block.width for block in blocks) != weight.shape[1]:
        raise ValueError(f"blocks: {sum(b.width for b in blocks)} columns for a Linear of {weight.shape[1]} inputs")
    for block in blocks:
        if not isinstance(block, Shared) and _rows(block) != rows:
            raise ValueError(f"blocks: a {type(block).__name__} block of {_rows(block)} rows for {rows} rows")
    bias = linear.bias if linear.bias is not None else weight.new_zeros(hidden)
    inputs, columns = [], []
    start = 0
    for block in blocks:
        w = weight[:, start:start + block.width]
        start += block.width
        if isinstance(block, Shared):
            bias = torch.addmv(bias, w, block.values)
        elif isinstance(block, Tiers):
            tiers, dim = block.vectors.shape
            inputs.append(block.weights)
            columns.append(torch.bmm(w.reshape(hidden, tiers, dim).transpose(0, 1),
                                     block.vectors.unsqueeze(-1)).squeeze(-1).t())  # M [H, T]
        else:
            inputs.append(block.values)
            columns.append(w)
    if not inputs:
        return bias[None, :].expand(rows, -1).clone()
    return torch.addmm(bias, torch.cat(inputs, dim=1), torch.cat(columns, dim=1).t())
