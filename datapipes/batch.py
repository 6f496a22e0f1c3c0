"""The batch types of the input pipeline, ids already remapped to contiguous vocabulary indices (0 = padding/unknown).

``SampleBatch`` is what the reader yields: one row per (user, target item) sample, without the history, which
lives once per user in the split's history store (``datapipes.histories``).
``RawBatch`` is the GSU's input: the same samples with their history windows gathered from the store
(``datapipes.histories.HistoryGather``; the predictor builds it from the caller's ids).
``Batch`` is what the model consumes: the GSU stage (``model.gsu.GsuStage``) turns a ``RawBatch`` into
a ``Batch`` ahead of the training step, so the model sees K selected behaviors, never the whole history
(except for variants whose GSU needs trained ID embeddings: SIM-soft and TWIN, which get ``history``);
a stored retrieval (``retrieval.RetrievedStage``) builds the same ``Batch`` from a ``SampleBatch`` directly.
"""

from dataclasses import dataclass, fields, replace
from typing import Optional, TypeVar

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

# Single-valued features pooled by the EmbeddingBagCollection, one table (id space) each.
PROFILE_FIELDS = ("profile_1", "profile_2", "profile_3", "profile_4", "profile_5")
SPARSE_FEATURES = ("user_id",) + PROFILE_FIELDS + ("item_city", "item_province")

# Per-position features of the EmbeddingCollection: feature -> table (id space).
SEQUENCE_FEATURES = {
    "target_item": "item",
    "target_cat": "category",
    "recent_item": "item",
    "recent_cat": "category",
    "gsu_item": "item",
    "gsu_cat": "category",
}
# Only for in-model GSU variants (SIM-soft, TWIN): the whole history goes to the item/category tables.
HISTORY_FEATURES = {"hist_item": "item", "hist_cat": "category"}

T = TypeVar("T", bound="_Movable")


class _Movable(Pipelineable):
    """Pipelineable for a dataclass whose fields are tensors, KeyedJaggedTensors or None."""

    def _map(self: T, fn) -> T:
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name))) for f in fields(self)})

    def to(self: T, device: torch.device, non_blocking: bool = False) -> T:
        return self._map(lambda v: v.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value.record_stream(stream)

    def pin_memory(self: T) -> T:
        return self._map(lambda v: v.pin_memory())


@dataclass
class SampleBatch(_Movable):
    """Reader output. B samples.

    labels:         float32 [B], 1.0 = click.
    user_id:        int64 [B] user index, also the user's row in the split's history store.
    profile:        int64 [B, 5], fields profile_1..profile_5 (raw columns 130_1..130_5), from the store.
    target_item, target_cat, item_city, item_province: int64 [B].
    history_end:    int64 [B]: how many of the user's history entries (oldest first) the sample sees; -1 = all.
    sample_index:   int64 [B]: the sample's row in its split (shards in order), the key of stored retrievals.
    """

    labels: torch.Tensor
    user_id: torch.Tensor
    profile: torch.Tensor
    target_item: torch.Tensor
    target_cat: torch.Tensor
    item_city: torch.Tensor
    item_province: torch.Tensor
    history_end: torch.Tensor
    sample_index: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class RawBatch(_Movable):
    """GSU input. B samples, L = longest history window in the batch (or the configured maximum).

    labels:         float32 [B], 1.0 = click.
    user_id:        int64 [B].
    profile:        int64 [B, 5], fields profile_1..profile_5 (raw columns 130_1..130_5).
    target_item, target_cat, item_city, item_province: int64 [B].
    history_items:  int64 [B, L], left-padded with 0, newest behavior at position L-1; a real behavior whose item
                    is out of the vocabulary is 0 too, with its category in history_cats.
    history_cats:   int64 [B, L], aligned entry for entry with history_items. Padding: item 0 and category 0.
    """

    labels: torch.Tensor
    user_id: torch.Tensor
    profile: torch.Tensor
    target_item: torch.Tensor
    target_cat: torch.Tensor
    item_city: torch.Tensor
    item_province: torch.Tensor
    history_items: torch.Tensor
    history_cats: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Batch(_Movable):
    """Model input, after the GSU stage. B samples, K = GSU top-k, S = recent length (50).

    sparse_features:   KJT with keys SPARSE_FEATURES, exactly one id per sample each (EBC input).
    sequence_features: KJT with keys SEQUENCE_FEATURES (+ HISTORY_FEATURES for in-model GSU): per sample,
                       target_* hold 1 id; recent_* the n_r <= S most recent behaviors, oldest first;
                       gsu_* the n_k <= K selected behaviors in descending GSU score (EC input).
    labels:            float32 [B].
    recent_scores:     float32 [B, S] cosine(target, behavior) in the multimodal table for the recent
                       behaviors, aligned with recent_* (slot j = j-th id of the sample); 0 past n_r.
    gsu_scores:        float32 [B, K] the cosines R of the selected behaviors, aligned with gsu_*; 0 past n_k.
    history_scores:    float32 [B, L] multimodal cosines of every history position (in-model GSU only),
                       aligned with hist_* (left-aligned, 0 past the sample's history length).
    gsu_index:         int64 [B, K] or None. Set (one user ranked against B candidates, ``Predictor.rank_indices``):
                       gsu_* hold the U distinct selected behaviors once, all in the first sample, and slot j of
                       sample b is behavior gsu_index[b, j] of them (-1: no behavior), aligned with gsu_scores.
    """

    sparse_features: KeyedJaggedTensor
    sequence_features: KeyedJaggedTensor
    labels: torch.Tensor
    recent_scores: torch.Tensor
    gsu_scores: torch.Tensor
    history_scores: Optional[torch.Tensor] = None
    gsu_index: Optional[torch.Tensor] = None

    def __reduce_ex__(self, protocol):
        """Small batches cross from a data worker to the trainer inline, as numpy arrays in the pickle: the
        default, one shared-memory segment per tensor (a KJT holds several), costs the trainer ~0.3 ms per tensor
        to receive, which at L = 100,000 with a stored retrieval (a 30 ms step) was 15-25% of the step. Batches
        of more than ``INLINE_BATCH_BYTES`` keep the shared-memory path (no copy through the pipe)."""
        tensors = [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]
        for kjt in (self.sparse_features, self.sequence_features):
            tensors += [t for t in (kjt.values(), kjt.lengths(), kjt.weights_or_none()) if t is not None]
        if sum(t.numel() * t.element_size() for t in tensors) > INLINE_BATCH_BYTES or any(t.device.type != "cpu" for t in tensors):
            return super().__reduce_ex__(protocol)
        arrays = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).numpy())
                  for f in fields(self) if f.name not in ("sparse_features", "sequence_features")}
        return (_inline_batch, (_kjt_arrays(self.sparse_features), _kjt_arrays(self.sequence_features), arrays))

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])


INLINE_BATCH_BYTES = 1 << 20


def _kjt_arrays(kjt: KeyedJaggedTensor) -> tuple:
    weights = kjt.weights_or_none()
    return (tuple(kjt.keys()), kjt.values().numpy(), kjt.lengths().numpy(), None if weights is None else weights.numpy())


def _kjt_of(parts: tuple) -> KeyedJaggedTensor:
    keys, values, lengths, weights = parts
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=torch.from_numpy(values), lengths=torch.from_numpy(lengths),
                                               weights=None if weights is None else torch.from_numpy(weights))


def _inline_batch(sparse: tuple, sequence: tuple, arrays: dict) -> Batch:
    return Batch(sparse_features=_kjt_of(sparse), sequence_features=_kjt_of(sequence),
                 **{name: None if a is None else torch.from_numpy(a) for name, a in arrays.items()})
