"""Random but valid model inputs (``Batch``) fabricated directly, without the GSU stage, for model tests.

Every sample has one id per sparse feature and per target feature; recent/gsu/history lengths are drawn in
[0, max] (sample 0 always has empty sequences, sample 1 full ones), ids in [1, vocab], scores in [-1, 1] with
zeros past each sample's length, as the Batch contract of datapipes/batch.py says.
"""

from typing import Mapping

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from datapipes.batch import HISTORY_FEATURES, SEQUENCE_FEATURES, SPARSE_FEATURES, Batch
from model.config import PIPELINE_GSU, ModelConfig
from model.tables import SPARSE_TABLES

SMALL_VOCAB = {
    "user": 40, "item": 300, "category": 30, "profile_1": 3, "profile_2": 5, "profile_3": 7,
    "profile_4": 4, "profile_5": 6, "item_city": 20, "item_province": 8,
}


def random_lengths(batch_size: int, max_len: int, generator: torch.Generator) -> torch.Tensor:
    """int64 [B] in [0, max_len]; sample 0 gets 0 and sample 1 gets max_len (when B > 1)."""
    lengths = torch.randint(0, max_len + 1, (batch_size,), generator=generator)
    lengths[0] = 0
    if batch_size > 1:
        lengths[1] = max_len
    return lengths


def scores_for(lengths: torch.Tensor, width: int, generator: torch.Generator) -> torch.Tensor:
    """float32 [B, width] uniform in [-1, 1] at positions < lengths, 0 elsewhere."""
    scores = torch.rand(lengths.shape[0], width, generator=generator) * 2 - 1
    return scores * (torch.arange(width)[None, :] < lengths[:, None])


def random_batch(
    cfg: ModelConfig,
    batch_size: int = 8,
    vocab_sizes: Mapping[str, int] = SMALL_VOCAB,
    history_len: int = 120,
    seed: int = 0,
) -> Batch:
    """A Batch for ``cfg``: gsu_* filled for pipeline GSUs (empty otherwise), hist_* + history_scores for in-model GSUs."""
    g = torch.Generator().manual_seed(seed)
    b = batch_size

    def ids(space: str, n: int) -> torch.Tensor:
        return torch.randint(1, vocab_sizes[space] + 1, (n,), generator=g)

    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=list(SPARSE_FEATURES),
        values=torch.cat([ids(SPARSE_TABLES[f], b) for f in SPARSE_FEATURES]),
        lengths=torch.ones(len(SPARSE_FEATURES) * b, dtype=torch.int64),
    )
    recent = random_lengths(b, cfg.recent_len, g)
    gsu = random_lengths(b, cfg.k, g) if cfg.gsu in PIPELINE_GSU else torch.zeros(b, dtype=torch.int64)
    lengths = {"target_item": torch.ones(b, dtype=torch.int64), "recent_item": recent, "gsu_item": gsu}
    lengths |= {"target_cat": lengths["target_item"], "recent_cat": recent, "gsu_cat": gsu}
    keys = list(SEQUENCE_FEATURES)
    history_scores = None
    if cfg.uses_history:
        history = random_lengths(b, history_len, g)
        lengths |= {"hist_item": history, "hist_cat": history}
        keys += list(HISTORY_FEATURES)
        history_scores = scores_for(history, history_len, g)
    table = {**SEQUENCE_FEATURES, **HISTORY_FEATURES}
    sequence = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([ids(table[k], int(lengths[k].sum())) for k in keys]),
        lengths=torch.cat([lengths[k] for k in keys]),
    )
    return Batch(
        sparse_features=sparse,
        sequence_features=sequence,
        labels=torch.randint(0, 2, (b,), generator=g).float(),
        recent_scores=scores_for(recent, cfg.recent_len, g),
        gsu_scores=scores_for(gsu, cfg.k, g),
        history_scores=history_scores,
    )
