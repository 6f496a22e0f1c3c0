"""ESU: summarises the K GSU-selected behaviors (and, with SimTier, the recent behaviors' cosines)."""

import torch
from torch import nn

from model.attention import TargetAttention
from model.columns import Block, Dense, concatenated
from model.config import ModelConfig
from model.simtier import SimTier


class Esu(nn.Module):
    """Configured by ``cfg.esu``: attention (TA or SA-TA) over the K behaviors and/or SimTier over their cosines.

    forward(query [B, E], behaviors [B, K, E], mask [B, K], similarity [B, K], recent_similarity [B, S],
    recent_mask [B, S]) -> [B, out_dim] = [attention pooled (E)] ++ [SimTier(K) (T*tier_dim)]
    ++ [SimTier(recent) (T*tier_dim), if cfg.simtier_recent].
    With ``cfg.gsu == "none"`` only the recent SimTier is built (the parts over K behaviors have no input).
    The attention takes ``cfg.r_temperature`` and ``cfg.attention_projections`` (see ``TargetAttention``).
    """

    def __init__(self, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        dim = 2 * cfg.id_dim
        kind = cfg.attention_kind if cfg.uses_lifelong else None
        self.attention = (
            TargetAttention(dim, cfg.attention_dim, kind == "sata", device=device, r_temperature=cfg.r_temperature,
                            projections=cfg.attention_projections)
            if kind else None
        )
        self.simtier = (
            SimTier(cfg.num_tiers, cfg.tier_width, cfg.tier_dim, device=device) if cfg.uses_simtier and cfg.uses_lifelong else None
        )
        self.recent_simtier = (
            SimTier(cfg.num_tiers, cfg.tier_width, cfg.tier_dim, device=device) if cfg.uses_simtier and cfg.simtier_recent else None
        )
        self.out_dim = (
            (dim if self.attention is not None else 0)
            + sum(m.out_dim for m in (self.simtier, self.recent_simtier) if m is not None)
        )

    def forward(
        self,
        query: torch.Tensor,
        behaviors: torch.Tensor,
        mask: torch.Tensor,
        similarity: torch.Tensor,
        recent_similarity: torch.Tensor,
        recent_mask: torch.Tensor,
    ) -> torch.Tensor:
        pooled = self.attention(query, behaviors, mask, similarity) if self.attention is not None else None
        return self._features(pooled, similarity, mask, recent_similarity, recent_mask)

    def blocks_shared(
        self,
        query: torch.Tensor,
        distinct: torch.Tensor,
        index: torch.Tensor,
        similarity: torch.Tensor,
        recent_similarity: torch.Tensor,
        recent_mask: torch.Tensor,
    ) -> list[Block]:
        """``forward``'s features, as column blocks in the same column order (``model.columns``: the pool ``Dense``,
        each SimTier ``Tiers``; ``concatenated`` joins them), with behaviors[b, j] = distinct[index[b, j]] (distinct
        [U, E], index int64 [B, K], -1: none, the mask): one user's candidates, whose selections share the U
        behaviors (``Batch.gsu_index``)."""
        mask = index >= 0
        pooled = (self.attention.forward_shared(query, distinct, index, mask, similarity)
                  if self.attention is not None else None)
        return self._blocks(pooled, similarity, mask, recent_similarity, recent_mask)

    def _features(self, pooled: torch.Tensor | None, similarity: torch.Tensor, mask: torch.Tensor,
                  recent_similarity: torch.Tensor, recent_mask: torch.Tensor) -> torch.Tensor:
        """[B, out_dim]: the attention's pooled behaviors (if any) ++ the SimTiers."""
        return concatenated(self._blocks(pooled, similarity, mask, recent_similarity, recent_mask),
                            similarity.shape[0])

    def _blocks(self, pooled: torch.Tensor | None, similarity: torch.Tensor, mask: torch.Tensor,
                recent_similarity: torch.Tensor, recent_mask: torch.Tensor) -> list[Block]:
        blocks: list[Block] = [] if pooled is None else [Dense(pooled)]
        if self.simtier is not None:
            blocks.append(self.simtier.columns(similarity, mask))
        if self.recent_simtier is not None:
            blocks.append(self.recent_simtier.columns(recent_similarity, recent_mask))
        return blocks
