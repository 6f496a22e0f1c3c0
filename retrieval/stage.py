"""``RetrievedStage``: ``SampleBatch -> Batch`` from a stored retrieval, without reading or scoring whole histories.

The selected behaviors and every cosine come from the retrieval; the recent behaviors are the newest entries of
each sample's visible history in the store (all of them are real behaviors). The Batch equals what
``HistoryGather`` + ``GsuStage`` build online for the same samples (tests/test_retrieval.py checks it).
"""

from dataclasses import dataclass

import numpy as np
import torch

from datapipes.batch import Batch, SampleBatch
from datapipes.histories import HistoryStore
from model.gsu.stage import Selected, assemble_batch
from retrieval.store import StoredRetrieval


def _flat(padded: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """[n, W] -> int64 [sum(lengths)]: each row's first ``lengths`` entries, row after row."""
    mask = np.arange(padded.shape[1])[None, :] < lengths[:, None]
    return torch.from_numpy(padded[mask].astype(np.int64))


@dataclass(frozen=True)
class RetrievedStage:
    """Picklable transform of one split: store (the split's ``HistoryStore``), retrieval (its ``StoredRetrieval``)."""

    store: HistoryStore
    retrieval: StoredRetrieval

    def select(self, sample: SampleBatch) -> Selected:
        spec = self.retrieval.spec
        stored = self.retrieval.rows(sample.sample_index.numpy())
        users, ends = sample.user_id.numpy(), sample.history_end.numpy()
        begin, end = self.store.bounds(users, ends)
        recent_len = np.minimum(end - begin, min(spec.recent_len, spec.max_seq_len))
        width = max(1, int(recent_len.max()) if recent_len.size else 1)
        items, cats = self.store.window(users, width, ends)
        # right-aligned windows: a sample's recent behaviors are its last recent_len columns, oldest first
        shift = width - recent_len
        cols = np.arange(width)[None, :]
        take = cols >= shift[:, None]
        lengths = stored["gsu_lengths"].astype(np.int64)
        return Selected(
            recent_item=torch.from_numpy(items[take]), recent_cat=torch.from_numpy(cats[take]),
            recent_lengths=torch.from_numpy(recent_len.astype(np.int64)),
            recent_scores=torch.from_numpy(np.ascontiguousarray(stored["recent_scores"])),
            gsu_item=_flat(stored["gsu_items"], lengths), gsu_cat=_flat(stored["gsu_cats"], lengths),
            gsu_lengths=torch.from_numpy(lengths), gsu_scores=torch.from_numpy(np.ascontiguousarray(stored["gsu_scores"])))

    def __call__(self, sample: SampleBatch) -> Batch:
        return assemble_batch(sample, self.select(sample))
