"""Training recipes of a comparison protocol: the optimizer, batch and epoch settings every model of it trains with.

``PAPER_RECIPE`` is the released MUSE code's (``config/*.json`` and ``main.py`` of github.com/alimama-tech/MUSE):
batch 1,000 per rank, 1 epoch, AdamW(lr 2e-4, weight decay 0.01) on the dense parameters, sparse Adam(lr 2e-3)
on the ID tables. Its model-side settings (ID tables at std 1e-3, the 256-128-64 tower) are fields of the
``paper_*`` presets of ``model.config.ModelConfig``, not of the recipe.

The ID tables train with TorchRec's fused in-backward optimizer (``training.optim``). fbgemm offers Adam
(``EmbOptimType.ADAM``) in its CUDA kernels only; its CPU kernels implement row-wise Adagrad alone, so on CPU the
recipe's stand-in is row-wise Adagrad at ``cpu_embedding_lr``: 1e-2, chosen so that a row updated ~100 times moves
about as far as under Adam at 2e-3 (Adagrad's steps shrink as 1/sqrt(t): sum ~ 2 lr sqrt(T) = 2e-3 T at T = 100).
"""

from dataclasses import dataclass
from typing import Any, Dict

from training.config import EMBEDDING_OPTIMIZERS


@dataclass(frozen=True)
class Recipe:
    """The ``TrainConfig`` fields a protocol fixes.

    name:                    label ("paper").
    batch_size:              samples per rank per step.
    epochs:                  passes over the train split.
    dense_lr, weight_decay:  AdamW on the dense parameters.
    embedding_optimizer, embedding_lr:  the ID tables' optimizer where the fused backend has it (CUDA).
    cpu_embedding_optimizer, cpu_embedding_lr:  what stands in on CPU (fbgemm's CPU kernels: row-wise Adagrad).
    """

    name: str
    batch_size: int
    epochs: int
    dense_lr: float
    weight_decay: float
    embedding_optimizer: str
    embedding_lr: float
    cpu_embedding_optimizer: str
    cpu_embedding_lr: float

    def __post_init__(self) -> None:
        for field in ("embedding_optimizer", "cpu_embedding_optimizer"):
            if getattr(self, field) not in EMBEDDING_OPTIMIZERS:
                raise ValueError(f"{field} must be one of {EMBEDDING_OPTIMIZERS}, got {getattr(self, field)!r}")

    def train_values(self, device_type: str) -> Dict[str, Any]:
        """The ``TrainConfig`` field values of this recipe on ``device_type`` ("cpu" or "cuda")."""
        on_cpu = device_type == "cpu"
        return {
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "dense_lr": self.dense_lr,
            "weight_decay": self.weight_decay,
            "embedding_optimizer": self.cpu_embedding_optimizer if on_cpu else self.embedding_optimizer,
            "embedding_lr": self.cpu_embedding_lr if on_cpu else self.embedding_lr,
        }

    def describe(self, device_type: str) -> str:
        """One line: what this recipe trains with on ``device_type``."""
        values = self.train_values(device_type)
        stand_in = (f" (stands in for {self.embedding_optimizer} {self.embedding_lr:g}: fbgemm's CPU kernels have no Adam)"
                    if values["embedding_optimizer"] != self.embedding_optimizer else "")
        return (f"recipe {self.name}: batch {self.batch_size}/rank, {self.epochs} epoch(s), AdamW {self.dense_lr:g} "
                f"(weight decay {self.weight_decay:g}) dense, {values['embedding_optimizer']} {values['embedding_lr']:g} "
                f"ID tables{stand_in}")


PAPER_RECIPE = Recipe(
    name="paper", batch_size=1000, epochs=1, dense_lr=2e-4, weight_decay=0.01,
    embedding_optimizer="adam", embedding_lr=2e-3, cpu_embedding_optimizer="rowwise_adagrad", cpu_embedding_lr=1e-2,
)
