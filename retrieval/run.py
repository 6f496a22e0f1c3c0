"""``muse retrieve``: the pipeline GSU run once over a dataset's splits, its results stored for training.

SPMD: under torchrun (``torchx_components/muse.py:retrieve``) rank r of W takes the contiguous samples
[r * N / W, (r + 1) * N / W) of each split (the reader's unshuffled rank split) and writes them as its own part;
rank 0 writes the description and renames the directory into place once every rank is done, so a retrieval
appears whole or not at all. In one process the data workers (``num_workers``) run the GSU side by side.
"""

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from common.errors import UserError
from datapipes.histories import HistoryGather
from datapipes.prepared import PreparedDataset
from datapipes.reader import ShardedLoader
from datapipes.tempdir import atomic_output_dir
from model.config import PIPELINE_GSU, ModelConfig
from model.gsu import GsuStage
from model.gsu.table import MMTable
from retrieval.store import Part, PartWriter, RetrievalSpec, default_location, write_meta


@dataclass(frozen=True)
class RetrieveConfig:
    """data: prepared dataset; model: whose pipeline GSU (gsu, k, recent_len) to run; max_seq_len: history length L
    searched (None = whole histories); splits; out: retrieval directory (default ``<data>/retrieval/<spec>``);
    batch_size: samples per GSU call; num_workers: data workers (the GSU runs in them); force: replace ``out``."""

    data: str
    model: ModelConfig
    max_seq_len: Optional[int] = None
    splits: Tuple[str, ...] = ("train", "test")
    out: Optional[str] = None
    batch_size: int = 256
    num_workers: int = 1
    force: bool = False


@dataclass(frozen=True)
class _SelectForStorage:
    """SampleBatch -> (sample_index, arrays of one retrieval part), in the data workers."""

    gather: HistoryGather
    stage: GsuStage

    def __call__(self, sample) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        selected = self.stage.select(self.gather(sample))
        k = self.stage.config.k
        lengths = selected.gsu_lengths.numpy()
        slots = np.arange(k)[None, :] < lengths[:, None]
        items = np.zeros((lengths.size, k), np.int32)
        cats = np.zeros((lengths.size, k), np.int32)
        items[slots], cats[slots] = selected.gsu_item.numpy(), selected.gsu_cat.numpy()
        return sample.sample_index.numpy(), {
            "gsu_items": items, "gsu_cats": cats, "gsu_lengths": lengths.astype(np.int32),
            "gsu_scores": selected.gsu_scores.numpy(), "recent_scores": selected.recent_scores.numpy()}


def rank_range(rows: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Samples [begin, end) of rank ``rank``: the reader's unshuffled split with the remainder kept."""
    per_rank, extra = divmod(rows, world_size)
    begin = rank * per_rank + min(rank, extra)
    return begin, begin + per_rank + (1 if rank < extra else 0)


def _check(cfg: RetrieveConfig, dataset: PreparedDataset, world_size: int) -> RetrievalSpec:
    if cfg.model.gsu not in PIPELINE_GSU:
        what = "reads no lifelong behavior" if cfg.model.gsu == "none" else "selects inside the model from trained embeddings"
        raise UserError(f"--model {cfg.model.name}: its GSU ({cfg.model.gsu}) {what}; nothing to retrieve "
                        f"(retrievable: {', '.join(PIPELINE_GSU)})")
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise UserError(f"--batch-size must be >= 1 and --num-workers >= 0, got {cfg.batch_size} and {cfg.num_workers}")
    if cfg.max_seq_len is not None and cfg.max_seq_len < 1:
        raise UserError(f"--max-seq-len must be >= 1, got {cfg.max_seq_len}")
    for split in cfg.splits:
        if dataset.split(split).rows < world_size:
            raise UserError(f"--nproc-per-node: {world_size} ranks, but split {split!r} has {dataset.split(split).rows} rows")
    return RetrievalSpec.of(cfg.model, cfg.max_seq_len, dataset)


def _write_parts(cfg: RetrieveConfig, dataset: PreparedDataset, spec: RetrievalSpec, tmp: str, rank: int,
                 world_size: int) -> None:
    table = MMTable.load(dataset.root, expected_dim=dataset.metadata.mm_dim)
    stage = GsuStage(cfg.model, table)
    for split in cfg.splits:
        begin, end = rank_range(dataset.split(split).rows, rank, world_size)
        transform = _SelectForStorage(HistoryGather(dataset.histories(split), cfg.max_seq_len), stage)
        loader = ShardedLoader(cfg.data, split, rank, world_size, cfg.batch_size, transform=transform,
                               num_workers=cfg.num_workers, shuffle=False, drop_last=False, drop_remainder=False)
        writer = PartWriter(os.path.join(tmp, split, f"part-{rank:05d}"), spec, begin, end)
        with tqdm(total=end - begin, unit=" samples", disable=rank != 0, file=sys.stderr, dynamic_ncols=True,
                  desc=f"retrieve {split}") as bar:
            for sample_index, values in loader:
                writer.write(sample_index, values)
                bar.update(sample_index.size)
        writer.close()


def _parts(dataset: PreparedDataset, splits: Tuple[str, ...], world_size: int) -> Dict[str, List[Part]]:
    return {split: [Part(f"{split}/part-{r:05d}", *rank_range(dataset.split(split).rows, r, world_size))
                    for r in range(world_size)] for split in splits}


def retrieve(cfg: RetrieveConfig) -> Tuple[str, dict]:
    """Run the retrieval (this process's rank of it); returns (directory, description) on rank 0, (directory, {})
    elsewhere. Under torchrun the process group must not be initialised yet (gloo is started here)."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        from training.distributed import init_distributed, shutdown

        env = init_distributed()
        rank, world_size = env.rank, env.world_size
    else:
        rank, world_size = 0, 1
    try:
        dataset = PreparedDataset.open(cfg.data)
        spec = _check(cfg, dataset, world_size)
        out = cfg.out or default_location(dataset.root, spec)
        if os.path.exists(out) and not cfg.force:  # every rank refuses before any work (rank 0 would, alone)
            raise UserError(f"--out {out}: already exists (choose a new directory or pass --force)")
        with contextlib.ExitStack() as stack:
            box = [stack.enter_context(atomic_output_dir(out, force=cfg.force, flag="--out")) if rank == 0 else None]
            if distributed:
                dist.broadcast_object_list(box, src=0)
            tmp = box[0]
            _write_parts(cfg, dataset, spec, tmp, rank, world_size)
            if distributed:
                dist.barrier()
            meta = write_meta(tmp, spec, cfg.model.name, dataset, _parts(dataset, cfg.splits, world_size)) if rank == 0 else {}
        if distributed:
            dist.barrier()
        return out, meta
    finally:
        if distributed:
            shutdown()
