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

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from datapipes.batch import SEQUENCE_FEATURES, SPARSE_FEATURES, Batch
from model.attention import DinAttention
from model.columns import Block, Dense, Shared, concatenated, folded_linear
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
        blocks = self.blocks(embeddings, recent_scores, gsu_scores, history_scores, shared_recent, gsu_index)
        return concatenated(blocks, recent_scores.shape[0])

    def blocks(
        self,
        embeddings: Mapping[str, JaggedTensor],
        recent_scores: torch.Tensor,
        gsu_scores: torch.Tensor,
        history_scores: Optional[torch.Tensor],
        shared_recent: bool = False,
        gsu_index: Optional[torch.Tensor] = None,
    ) -> list[Block]:
        """``forward``'s output as column blocks in the same column order (``model.columns``), [B, out_dim] in all."""
        cfg = self.cfg
        target = behavior_values(embeddings["target_item"], embeddings["target_cat"])  # [B, E]: one id per sample
        recent_item = embeddings["recent_item"]
        _check_width("batch.recent_scores", recent_scores, cfg.recent_len)
        recent_keys = behavior_values(recent_item, embeddings["recent_cat"])
        if shared_recent:  # every sample's recent window is the R behaviors given once (``MuseModel.forward``)
            recent_lengths = torch.full((target.shape[0],), recent_keys.shape[0], dtype=torch.int64,
                                        device=target.device)
            blocks: list[Block] = [Dense(target), Dense(self.din.forward_shared(target, recent_keys))]
        else:
            recent_lengths = recent_item.lengths()
            blocks = [Dense(target),
                      Dense(self.din(target, recent_keys, recent_lengths, recent_item.offsets(), cfg.recent_len))]
        if self.esu is None:
            return blocks
        recent_mask = length_mask(recent_lengths, cfg.recent_len)
        if cfg.uses_history:
            behaviors, mask, similarity = self._select_from_history(target, embeddings, history_scores)
            return blocks + [Dense(self.esu(target, behaviors, mask, similarity, recent_scores, recent_mask))]
        _check_width("batch.gsu_scores", gsu_scores, cfg.k)
        if gsu_index is not None:  # the distinct selected behaviors given once (``Batch.gsu_index``)
            _check_width("batch.gsu_index", gsu_index, cfg.k)
            distinct = behavior_values(embeddings["gsu_item"], embeddings["gsu_cat"])  # [U, E]
            return blocks + self.esu.blocks_shared(target, distinct, gsu_index, gsu_scores, recent_scores, recent_mask)
        behaviors, mask = padded_behaviors(embeddings["gsu_item"], embeddings["gsu_cat"], cfg.k)
        return blocks + [Dense(self.esu(target, behaviors, mask, gsu_scores, recent_scores, recent_mask))]

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

    def forward_blocks(self, sparse: Mapping[str, Block], interest: Sequence[Block], rows: int) -> torch.Tensor:
        """``forward`` of ``rows`` samples with the pooled sparse features (by name) and the interest as column
        blocks (``InterestArch.blocks``): the first Linear folded over them (``model.columns.folded_linear``), so
        a ``Shared`` feature (one user's id and profile against its candidates) is taken once. Equal to
        ``forward`` to float32 rounding."""
        blocks = [sparse[name] for name in SPARSE_FEATURES] + list(interest)
        layers = list(self.mlp) + [self.logit]
        hidden = folded_linear(layers[0], blocks, rows)
        for layer in layers[1:]:
            hidden = layer(hidden)
        return hidden.squeeze(-1)


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
        ESU attends over them by index (``TargetAttention.forward_shared``). ``rank_user`` is the same from ids, with
        the over arch's first Linear folded (what the predictor's rank calls)."""
        sequence = self.sequence_ec(batch.sequence_features)
        sparse = self.sparse_ebc(batch.sparse_features)
        interest = self.interest_arch(sequence, batch.recent_scores, batch.gsu_scores, batch.history_scores,
                                      shared_recent=shared_recent, gsu_index=batch.gsu_index)
        return self.over_arch(sparse, interest)

    @torch.no_grad()
    def rank_user(self, sparse: Mapping[str, torch.Tensor], sequence: Mapping[str, torch.Tensor],
                  recent_scores: torch.Tensor, gsu_scores: torch.Tensor, gsu_index: torch.Tensor) -> torch.Tensor:
        """Logits [B] of one user's B candidates, ``forward(batch, shared_recent=True)`` of the ``Batch`` these ids
        make, without building it: each feature's rows are read from its table directly (``F.embedding``; a pooled
        feature of one id per sample is that id's row), not through KeyedJaggedTensors and the collections'
        forward (Python that a rank would pay on every call). Unsharded models only (serving's).

        sparse: {SPARSE_FEATURES name: int64 [B], or [1] for an id every candidate shares (the user's id and
        profile)}; sequence: {SEQUENCE_FEATURES name: int64 ids}: target_item / target_cat [B], recent_item /
        recent_cat [R] (the window, oldest first), gsu_item / gsu_cat [U] (the distinct selected behaviors);
        recent_scores [B, S], gsu_scores [B, K], gsu_index int64 [B, K] as in ``Batch``."""
        rows = recent_scores.shape[0]
        for name in ("target_item", "target_cat"):
            if sequence[name].numel() != rows:
                raise ValueError(f"sequence[{name!r}]: {sequence[name].numel()} ids for {rows} rows (recent_scores)")
        for name in SPARSE_FEATURES:
            if sparse[name].numel() not in (1, rows):
                raise ValueError(f"sparse[{name!r}]: {sparse[name].numel()} ids, expected 1 (shared) or {rows}")
        if rows == 0:
            return recent_scores.new_zeros(0)
        tables = self._feature_tables()
        pooled: dict[str, Block] = {}
        for name in SPARSE_FEATURES:
            ids = sparse[name].reshape(-1)
            values = F.embedding(ids, tables[name])
            pooled[name] = Shared(values[0]) if ids.shape[0] == 1 and rows != 1 else Dense(values)
        embeddings = {}
        for name in SEQUENCE_FEATURES:
            ids = sequence[name].reshape(-1)
            lengths = torch.ones(rows, dtype=torch.int64)  # target_*: one id per sample
            if not name.startswith("target_"):  # given once, all in the first sample (as ``Batch`` gives them)
                lengths.zero_()[0] = ids.shape[0]
            embeddings[name] = JaggedTensor(values=F.embedding(ids, tables[name]), lengths=lengths)
        blocks = self.interest_arch.blocks(embeddings, recent_scores, gsu_scores, None, shared_recent=True,
                                           gsu_index=gsu_index)
        return self.over_arch.forward_blocks(pooled, blocks, rows)

    def _feature_tables(self) -> dict[str, torch.Tensor]:
        """{feature: its table's weight} for every sparse and sequence feature (unsharded collections, not replaced
        after the first call); the (feature, table module) pairs are found once, the weights read on each call."""
        modules = self.__dict__.get("_feature_modules")
        if modules is None:
            ebc, ec = self.sparse_ebc, self.sequence_ec
            modules = {feature: ebc.embedding_bags[config.name]
                       for config in ebc.embedding_bag_configs() for feature in config.feature_names}
            modules.update({feature: ec.embeddings[config.name]
                            for config in ec.embedding_configs() for feature in config.feature_names})
            self.__dict__["_feature_modules"] = modules
        return {feature: module.weight for feature, module in modules.items()}


def build_model(cfg: ModelConfig, vocab_sizes: Mapping[str, int], device: torch.device | str = "cpu") -> MuseModel:
    """``MuseModel(cfg, vocab_sizes, device)``."""
    return MuseModel(cfg, vocab_sizes, device=device)


def _check_width(name: str, scores: torch.Tensor, width: int) -> None:
    if scores.dim() != 2 or scores.shape[1] != width:
        raise ValueError(f"{name} must be [B, {width}], got {list(scores.shape)}")
