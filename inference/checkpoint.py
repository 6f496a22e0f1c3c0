"""Gather a run's newest complete checkpoint into one unsharded, single-process model.

The trainer saves ``{"model": dmp.state_dict(), "optim": ...}`` with torch.distributed.checkpoint (DCP),
each rank writing its own shards. DCP reshards on load, and with no process group it loads in this one
process: the unsharded ``MuseTrain(MuseModel)`` offers plain tensors under the same keys and DCP fills
them from every rank's shards. Only tensors are read (no pickled objects), and the optimizer state is
not read at all.
"""

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from common.errors import DataError, UserError
from datapipes.prepared import PreparedDataset
from model.muse import MuseModel, build_model
from model.train_module import MuseTrain
from training.checkpoint import CheckpointInfo, latest_checkpoint
from training.config import TrainConfig, load_config
from training.metrics import read_metrics


@dataclass
class TrainedModel:
    """An unsharded model in eval mode with the config, checkpoint and metrics it came from."""

    config: TrainConfig
    checkpoint: CheckpointInfo
    model: MuseModel
    dataset: PreparedDataset
    metrics: List[Dict[str, Any]]


def load_trained_model(run_dir: str, data_dir: Optional[str] = None) -> TrainedModel:
    """The newest complete checkpoint of ``run_dir`` in an unsharded ``MuseModel`` on CPU.

    ``data_dir`` overrides the prepared dataset recorded in the run's config (vocabularies, multimodal
    table), e.g. when the dataset moved since training.
    """
    config = load_config(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(f"--run {run_dir}: no complete checkpoint (checkpoints/step-*/ with meta.json)")
    dataset = PreparedDataset.open(data_dir or config.data)
    wrapper = MuseTrain(build_model(config.model, dataset.metadata.vocab_sizes, device="cpu"))
    state = {"model": wrapper.state_dict()}
    try:
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=checkpoint.path)
    except (CheckpointException, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{checkpoint.path}: (checkpoint): cannot be loaded into {config.model.name}: {first}") from None
    wrapper.load_state_dict(state["model"])
    model = wrapper.model.eval()
    return TrainedModel(config, checkpoint, model, dataset, read_metrics(run_dir))


def model_state(model: MuseModel) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` (the inference weights), detached, on CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
