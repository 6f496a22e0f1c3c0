"""In-model GSU (SIM-soft, TWIN): top-K of the whole history by a relevance computed from trained ID embeddings.

SIM-soft ranks behaviors by the inner product of target and behavior ID embeddings; TWIN by the ESU's own
target-attention score. The selection itself carries no gradient; the selected embeddings and scores do.
"""

import torch


def topk_positions(relevance: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the top min(k, L) valid entries of relevance [B, L], by descending relevance.

    Returns positions int64 [B, min(k, L)] and valid bool [B, min(k, L)]; when a sample has fewer than k valid
    positions the remaining slots come last and are marked invalid. Ties are broken arbitrarily.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    masked = relevance.detach().masked_fill(~mask, float("-inf"))
    positions = masked.topk(min(k, relevance.shape[1]), dim=1).indices
    return positions, mask.gather(1, positions)


def gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values [B, L] or [B, L, E] at positions [B, K] -> [B, K] or [B, K, E]."""
    if values.dim() == 2:
        return values.gather(1, positions)
    return values.gather(1, positions.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def id_relevance(query: torch.Tensor, behaviors: torch.Tensor) -> torch.Tensor:
    """SIM-soft relevance: inner product of target [B, E] and behavior [B, L, E] ID embeddings -> [B, L]."""
    return torch.bmm(behaviors, query.unsqueeze(-1)).squeeze(-1)
