"""Loss and the training wrapper expected by TorchRec's train pipelines (forward -> (loss, outputs))."""

import torch
import torch.nn.functional as F
from torch import nn

from datapipes.batch import Batch
from model.muse import MuseModel


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of click logits [B] against labels [B] (1.0 = click)."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class MuseTrain(nn.Module):
    """Wraps a MuseModel: forward(batch) -> (loss, (loss.detach(), logits.detach(), labels)), like torchrec's DLRMTrain."""

    def __init__(self, model: MuseModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch)
        loss = bce_loss(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)
