"""Optimizers: the ID tables' optimizer fused into the backward pass, AdamW on the dense parameters.

The embedding optimizer is attached to the tables before sharding (``apply_optimizer_in_backward``);
every table the planner shards (table-, row-, column-wise: fused kernels) updates its rows inside the
backward kernel and is exposed as ``dmp.fused_optimizer``. The planner is kept off data_parallel
(``sharding.constraints.with_fused_defaults``), so every ID table is trained this way at any world size.
Only a table the user constrains to ``--shard TABLE=data_parallel`` becomes a plain replicated
parameter under DDP: it has no in-backward optimizer and is trained by the dense AdamW with the other
dense parameters. ``CombinedOptimizer`` steps and checkpoints both as one.
"""

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from training.config import TrainConfig


def attach_embedding_optimizer(model: nn.Module, config: TrainConfig) -> None:
    """Give every ID table of ``model`` (still unsharded, possibly on meta) its in-backward optimizer."""
    params = [p for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) for p in m.parameters()]
    if config.embedding_optimizer == "rowwise_adagrad":
        apply_optimizer_in_backward(RowWiseAdagrad, params, {"lr": config.embedding_lr})
    else:
        apply_optimizer_in_backward(torch.optim.Adam, params, {"lr": config.embedding_lr})


def make_optimizer(dmp: DistributedModelParallel, config: TrainConfig) -> CombinedOptimizer:
    """fused embedding optimizer + AdamW(dense), keyed by parameter name (checkpointable with DCP)."""
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.AdamW(params, lr=config.dense_lr, weight_decay=config.weight_decay),
    )
    return CombinedOptimizer([("embedding", dmp.fused_optimizer), ("dense", dense)])
