"""The trainer's view of the data: the GSU stage as the reader's transform, an endless train stream
whose position follows the step count, and the test split for evaluation.

The reader (``datapipes.reader``) gives every rank the same number of batches per epoch, and its
position is (epoch, batches consumed). The trainer's TrainPipelineSparseDist reads two batches ahead,
so the reader's own counter runs ahead of the training step; the position of step ``s`` is therefore
derived from ``s`` itself: epoch ``s // steps_per_epoch``, batch ``s % steps_per_epoch``.
"""

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from datapipes.batch import Batch, SampleBatch
from datapipes.histories import Chain, HistoryGather
from datapipes.prepared import PreparedDataset
from datapipes.schema import SPLITS
from datapipes.reader import ShardedLoader, make_dataloader
from model.gsu import GsuStage
from model.gsu.table import MMTable
from retrieval.stage import RetrievedStage
from retrieval.store import RetrievalSpec, find_retrieval, open_split
from training.config import TrainConfig
from training.distributed import DistEnv


def gsu_stage(config: TrainConfig, dataset: PreparedDataset) -> GsuStage:
    """The picklable RawBatch -> Batch transform (GSU in the data workers, ahead of the step)."""
    return GsuStage(config.model, MMTable.load(dataset.root, expected_dim=dataset.metadata.mm_dim))


def history_gather(config: TrainConfig, dataset: PreparedDataset, split: str) -> HistoryGather:
    """SampleBatch -> RawBatch from the split's history store: windows of up to ``max_seq_len`` entries, or only
    the recent ``recent_len`` when the model reads no lifelong behavior (DIN: the same batches, fewer reads)."""
    window = config.model.recent_len if not config.model.uses_lifelong else None
    return HistoryGather(dataset.histories(split), config.max_seq_len, window)


def stored_retrieval(config: TrainConfig, dataset: PreparedDataset) -> Optional[str]:
    """The retrieval directory this run reads (``config.retrieval``, for both splits), or None: GSU online."""
    spec = RetrievalSpec.of(config.model, config.max_seq_len, dataset)
    return find_retrieval(dataset, spec, config.retrieval, list(SPLITS))


def batch_transform(config: TrainConfig, dataset: PreparedDataset, split: str,
                    retrieval: Optional[str] = None) -> Callable[[SampleBatch], Batch]:
    """The picklable SampleBatch -> Batch transform of ``split``, run in the data workers: the stored ``retrieval``
    when given (no history is read beyond the recent window), else the GSU online over the history store."""
    if retrieval is not None:
        return RetrievedStage(dataset.histories(split), open_split(retrieval, split))
    return Chain(history_gather(config, dataset, split), gsu_stage(config, dataset))


@dataclass(frozen=True)
class DataPosition:
    """Where the train stream stands after ``step`` steps."""

    epoch: int
    batch: int

    @classmethod
    def at_step(cls, step: int, steps_per_epoch: int) -> "DataPosition":
        return cls(step // steps_per_epoch, step % steps_per_epoch)

    def rescaled(self, old_steps_per_epoch: int, new_steps_per_epoch: int) -> "DataPosition":
        """The same fraction of the epoch at another world size (whose epoch has a different length)."""
        return DataPosition(self.epoch, self.batch * new_steps_per_epoch // old_steps_per_epoch)


class TrainStream:
    """Endless iterator of ``Batch`` for this rank, epoch after epoch (the next epoch's workers start before the
    current one ends: ``ShardedLoader.endless``), timing how long ``next`` waits."""

    def __init__(self, config: TrainConfig, env: DistEnv, dataset: PreparedDataset, retrieval: Optional[str] = None) -> None:
        self.loader: ShardedLoader = make_dataloader(
            config.data, "train", env.rank, env.world_size, config.batch_size,
            transform=batch_transform(config, dataset, "train", retrieval), num_workers=config.num_workers, shuffle=True,
            seed=config.seed, max_seq_len=config.max_seq_len, drop_last=True, group_users=config.group_users,
        )
        self.steps_per_epoch = len(self.loader)
        self.wait_seconds = 0.0
        self._iter: Optional[Iterator[Batch]] = None

    def seek(self, position: DataPosition) -> None:
        """Continue from ``position`` (before the first ``next``)."""
        self.loader.load_state_dict({"epoch": position.epoch, "batches_consumed": position.batch})

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        if self._iter is None:
            self._iter = self.loader.endless()
        batch = next(self._iter)
        self.wait_seconds += time.perf_counter() - start
        return batch


def test_loader(config: TrainConfig, env: DistEnv, dataset: PreparedDataset, retrieval: Optional[str] = None) -> ShardedLoader:
    """This rank's part of the test split, every row once, in order."""
    return make_dataloader(
        config.data, "test", env.rank, env.world_size, config.eval_batch_size,
        transform=batch_transform(config, dataset, "test", retrieval), num_workers=config.num_workers, shuffle=False,
        seed=config.seed, max_seq_len=config.max_seq_len, drop_last=False, drop_remainder=False,
    )
