"""Jagged -> padded helpers for the EmbeddingCollection's per-feature ``JaggedTensor`` outputs.

A JaggedTensor of B samples holds ``values`` [N, D] (N = sum of lengths) and ``offsets`` [B + 1]; padding to
[B, S, D] uses fbgemm's ``jagged_to_padded_dense`` (one kernel, differentiable, no Python loop, no host sync).
"""

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor


def pad_values(values: torch.Tensor, offsets: torch.Tensor, length: int) -> torch.Tensor:
    """values [N, D] with offsets [B + 1] -> [B, length, D], zeros past each sample's length (longer ones cut).
    On CPU, when every sample holds exactly ``length`` values (serving's K behaviors of each candidate), a view of
    them (the check reads the offsets: no host sync is added on an accelerator, where the kernel always runs)."""
    batch = offsets.shape[0] - 1
    if (values.device.type == "cpu" and batch and values.shape[0] == batch * length
            and torch.equal(offsets, torch.arange(batch + 1) * length)):
        return values.view(batch, length, values.shape[1])
    return torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [length], 0.0)


def length_mask(lengths: torch.Tensor, length: int) -> torch.Tensor:
    """lengths [B] -> bool [B, length], True at positions j < lengths[b]."""
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]


def behavior_values(item: JaggedTensor, category: JaggedTensor) -> torch.Tensor:
    """Behavior embeddings item ++ category: [N, 2 * id_dim] (the two features must have equal lengths)."""
    return torch.cat([item.values(), category.values()], dim=1)


def padded_behaviors(item: JaggedTensor, category: JaggedTensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Behavior embeddings padded to [B, length, 2 * id_dim] and their validity mask bool [B, length]."""
    padded = pad_values(behavior_values(item, category), item.offsets(), length)
    return padded, length_mask(item.lengths(), length)
