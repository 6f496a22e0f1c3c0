"""ID embedding tables of the model: one table per id space, shared by every feature of that space.

The EmbeddingCollection (per-position lookups) holds ``item`` and ``category``, shared by the target, the
recent behaviors, the GSU-selected behaviors and (for in-model GSU) the whole history. The
EmbeddingBagCollection (one pooled id per sample) holds ``user``, ``profile_1..5``, ``item_city`` and
``item_province``. Every table has ``vocab_size + 1`` rows; row 0 is padding/unknown. ``cfg.embedding_init_std`` sets their initial spread.
"""

import math
from typing import Mapping

from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType

from datapipes.batch import HISTORY_FEATURES, SEQUENCE_FEATURES, SPARSE_FEATURES
from model.config import ModelConfig

# EBC feature -> id space (key of metadata.json's vocab_sizes); the table is named after the id space.
SPARSE_TABLES = {feature: ("user" if feature == "user_id" else feature) for feature in SPARSE_FEATURES}
# Id spaces that must appear in vocab_sizes.
ID_SPACES = tuple(sorted(set(SEQUENCE_FEATURES.values()) | set(SPARSE_TABLES.values())))


def sequence_feature_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Keys of ``Batch.sequence_features`` for this config, in KJT order: SEQUENCE_FEATURES (+ HISTORY_FEATURES)."""
    names = tuple(SEQUENCE_FEATURES)
    return names + tuple(HISTORY_FEATURES) if cfg.uses_history else names


def check_vocab_sizes(vocab_sizes: Mapping[str, int]) -> None:
    """Raise ValueError naming the first missing or non-positive entry of ``vocab_sizes``."""
    for space in ID_SPACES:
        if space not in vocab_sizes:
            raise ValueError(f"vocab_sizes[{space!r}] is missing")
        size = vocab_sizes[space]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"vocab_sizes[{space!r}] must be a positive int, got {size!r}")


def embedding_configs(cfg: ModelConfig, vocab_sizes: Mapping[str, int]) -> tuple[list[EmbeddingConfig], list[EmbeddingBagConfig]]:
    """(EmbeddingCollection tables, EmbeddingBagCollection tables) for ``cfg``, ``id_dim`` wide, ``vocab + 1`` rows."""
    check_vocab_sizes(vocab_sizes)
    # cfg.embedding_init_std: uniform in +-sqrt(3) std (TorchRec's sharded kernels initialise uniformly).
    bound = None if cfg.embedding_init_std is None else math.sqrt(3.0) * cfg.embedding_init_std
    init = {} if bound is None else {"weight_init_min": -bound, "weight_init_max": bound}
    features_by_space: dict[str, list[str]] = {}
    for feature in sequence_feature_names(cfg):
        space = {**SEQUENCE_FEATURES, **HISTORY_FEATURES}[feature]
        features_by_space.setdefault(space, []).append(feature)
    sequence_tables = [
        EmbeddingConfig(name=space, embedding_dim=cfg.id_dim, num_embeddings=vocab_sizes[space] + 1, feature_names=features,
                        **init)
        for space, features in features_by_space.items()
    ]
    sparse_tables = [
        EmbeddingBagConfig(
            name=space,
            embedding_dim=cfg.id_dim,
            num_embeddings=vocab_sizes[space] + 1,
            feature_names=[feature],
            pooling=PoolingType.SUM,
            **init,
        )
        for feature, space in SPARSE_TABLES.items()
    ]
    return sequence_tables, sparse_tables
