"""Gather a run's newest complete checkpoint into one unsharded, single-process model.

The trainer saves ``{"model": dmp.state_dict(), "optim": ...}`` with torch.distributed.checkpoint (DCP),
each rank writing its own shards; ``training.checkpoint.load_model_weights`` reassembles the model part
in this one process (tensors only, no optimizer state).
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from common.errors import UserError
from datapipes.prepared import PreparedDataset
from model.muse import MuseModel, build_model
from training.checkpoint import CheckpointInfo, latest_checkpoint, load_model_weights
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
    model = load_model_weights(checkpoint.path, build_model(config.model, dataset.metadata.vocab_sizes, device="cpu"))
    model.eval()
    return TrainedModel(config, checkpoint, model, dataset, read_metrics(run_dir))


def model_state(model: MuseModel) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` (the inference weights), detached, on CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
