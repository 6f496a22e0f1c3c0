"""The MUSE model family on TorchRec: sharded ID embeddings, DIN over recent behaviors, GSU/ESU over the
lifelong history, and an MLP tower to one click logit per sample.

Layout (in the style of torchrec's DLRM, one job per arch):

    sequence_ec   EmbeddingCollection    Batch.sequence_features -> {feature: JaggedTensor [n, id_dim]}
    sparse_ebc    EmbeddingBagCollection Batch.sparse_features   -> KeyedTensor [B, 8 * id_dim]
    interest_arch InterestArch           target ++ DIN(recent) ++ ESU(K behaviors)     -> [B, interest_dim]
    over_arch     OverArch               MLP tower over sparse ++ interest               -> logits [B]

``forward`` only reads batch attributes and calls these four modules, so TorchRec's pipeline tracer
(TrainPipelineSparseDist) sees the sparse modules fed straight from ``batch.sequence_features`` /
``batch.sparse_features`` and treats the two dense archs as leaves.
"""

from typing import Mapping, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from datapipes.batch import SPARSE_FEATURES, Batch
from model.attention import DinAttention
from model.config import ModelConfig
from model.esu import Esu
from model.in_model_gsu import gather_positions, id_relevance, topk_positions
from model.jagged import behavior_values, length_mask, padded_behaviors
from model.tables import embedding_configs
from model.tower import MLP


class InterestArch(nn.Module):
    """User-interest features from the sequence embeddings.

    Inputs: embeddings {feature: JaggedTensor} of the EmbeddingCollection; recent_scores [B, S];
    gsu_scores [B, K]; history_scores [B, L] (in-model GSU only, else unused).
    Output [B, out_dim]: target item ++ category (2*id_dim) ++ DIN over the recent S (2*id_dim)
    ++ ESU features (lifelong variants; with gsu "none" the recent SimTier, if configured).
    """

    def __init__(self, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        dim = 2 * cfg.id_dim
        self.din = DinAttention(dim, cfg.din_dims, cfg.activation, device=device)
        self.esu = Esu(cfg, device=device) if cfg.uses_esu else None
        self.out_dim = 2 * dim + (self.esu.out_dim if self.esu is not None else 0)

    def forward(
        self,
        embeddings: Mapping[str, JaggedTensor],
        recent_scores: torch.Tensor,
        gsu_scores: torch.Tensor,
        history_scores: Optional[torch.Tensor],
        shared_recent: bool = False,
        gsu_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        target = behavior_values(embeddings["target_item"], embeddings["target_cat"])  # [B, E]: one id per sample
        recent_item = embeddings["recent_item"]
        _check_width("batch.recent_scores", recent_scores, cfg.recent_len)
        recent_keys = behavior_values(recent_item, embeddings["recent_cat"])
        if shared_recent:  # every sample's recent window is the R behaviors given once (``MuseModel.forward``)
            recent_lengths = torch.full_like(recent_item.lengths(), recent_keys.shape[0])
            parts = [target, self.din.forward_shared(target, recent_keys)]
        else:
            recent_lengths = recent_item.lengths()
            parts = [target, self.din(target, recent_keys, recent_lengths, recent_item.offsets(), cfg.recent_len)]
        if self.esu is None:
            return torch.cat(parts, dim=1)
        recent_mask = length_mask(recent_lengths, cfg.recent_len)
        if cfg.uses_history:
            behaviors, mask, similarity = self._select_from_history(target, embeddings, history_scores)
            parts.append(self.esu(target, behaviors, mask, similarity, recent_scores, recent_mask))
            return torch.cat(parts, dim=1)
        _check_width("batch.gsu_scores", gsu_scores, cfg.k)
        if gsu_index is not None:  # the distinct selected behaviors given once (``Batch.gsu_index``)
            _check_width("batch.gsu_index", gsu_index, cfg.k)
            distinct = behavior_values(embeddings["gsu_item"], embeddings["gsu_cat"])  # [U, E]
            parts.append(self.esu.forward_shared(target, distinct, gsu_index, gsu_scores, recent_scores, recent_mask))
        else:
            behaviors, mask = padded_behaviors(embeddings["gsu_item"], embeddings["gsu_cat"], cfg.k)
            parts.append(self.esu(target, behaviors, mask, gsu_scores, recent_scores, recent_mask))
        return torch.cat(parts, dim=1)

    def _select_from_history(
        self, target: torch.Tensor, embeddings: Mapping[str, JaggedTensor], history_scores: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """In-model GSU: (behaviors [B, K', E], mask [B, K'], R [B, K']) with K' = min(k, L)."""
        if history_scores is None:
            raise ValueError(f"batch.history_scores is required for gsu={self.cfg.gsu!r}")
        history, history_mask = padded_behaviors(embeddings["hist_item"], embeddings["hist_cat"], history_scores.shape[1])
        if self.cfg.gsu == "id":
            relevance = id_relevance(target, history)
        else:
            relevance = self.esu.attention.id_scores(target, history)  # TWIN: the ESU's attention over IDs
        positions, mask = topk_positions(relevance, history_mask, self.cfg.k)
        similarity = gather_positions(history_scores, positions) * mask
        return gather_positions(history, positions), mask, similarity


class OverArch(nn.Module):
    """MLP tower: pooled sparse embeddings [B, 8*id_dim] (SPARSE_FEATURES order) ++ interest [B, interest_dim]
    -> logits float32 [B]."""

    def __init__(self, in_dim: int, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, cfg.mlp_dims, cfg.activation, device=device)
        self.logit = nn.Linear(self.mlp.out_dim, 1, device=device)

    def forward(self, sparse: KeyedTensor, interest: torch.Tensor) -> torch.Tensor:
        # A sharded EBC orders its output keys by shard placement: read the features by name.
        pooled = sparse.to_dict()
        features = [pooled[name] for name in SPARSE_FEATURES] + [interest]
        return self.logit(self.mlp(torch.cat(features, dim=1))).squeeze(-1)


class MuseModel(nn.Module):
    """One model of the family chosen by ``cfg`` (see ``ModelConfig``). forward(batch) -> logits float32 [B].

    vocab_sizes: real ids per id space (metadata.json's ``vocab_sizes``); tables get one more row (0 = padding).
    device: where parameters are created; ``"meta"`` for DistributedModelParallel's lazy initialisation.
    """

    def __init__(self, cfg: ModelConfig, vocab_sizes: Mapping[str, int], device: torch.device | str = "cpu") -> None:
        super().__init__()
        device = torch.device(device)
        self.cfg = cfg
        sequence_tables, sparse_tables = embedding_configs(cfg, vocab_sizes)
        self.sequence_ec = EmbeddingCollection(tables=sequence_tables, device=device)
        self.sparse_ebc = EmbeddingBagCollection(tables=sparse_tables, device=device)
        self.interest_arch = InterestArch(cfg, device=device)
        self.over_arch = OverArch(len(SPARSE_FEATURES) * cfg.id_dim + self.interest_arch.out_dim, cfg, device=device)

    def forward(self, batch: Batch, shared_recent: bool = False) -> torch.Tensor:
        """Logits [B]. ``shared_recent`` (inference, one user ranked against B candidates): every sample's recent
        window is the same R behaviors, given once in ``batch.sequence_features`` (recent_item / recent_cat: R
        values, all in the first sample; ``recent_scores`` stays [B, S], per candidate); DIN then scores the B x R
        pairs without repeating the keys (``DinAttention.forward_shared``). Equal to the batch with the window
        repeated in every sample. A batch with ``gsu_index`` (``Batch``) gives the selected behaviors once too, and the
        ESU attends over them by index (``TargetAttention.forward_shared``)."""
        sequence = self.sequence_ec(batch.sequence_features)
        sparse = self.sparse_ebc(batch.sparse_features)
        interest = self.interest_arch(sequence, batch.recent_scores, batch.gsu_scores, batch.history_scores,
                                      shared_recent=shared_recent, gsu_index=batch.gsu_index)
        return self.over_arch(sparse, interest)


def build_model(cfg: ModelConfig, vocab_sizes: Mapping[str, int], device: torch.device | str = "cpu") -> MuseModel:
    """``MuseModel(cfg, vocab_sizes, device)``."""
    return MuseModel(cfg, vocab_sizes, device=device)


def _check_width(name: str, scores: torch.Tensor, width: int) -> None:
    if scores.dim() != 2 or scores.shape[1] != width:
        raise ValueError(f"{name} must be [B, {width}], got {list(scores.shape)}")
