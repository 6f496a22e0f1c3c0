"""Contract between the GSU stage and the model: GsuStage's Batch feeds every preset of the model family."""

import pytest
import torch

from datapipes.batch import RawBatch
from model.config import ModelConfig
from model.gsu import GsuStage
from model.muse import build_model
from model.train_module import bce_loss
from tests.model_inputs import SMALL_VOCAB


def _raw_batch(batch_size: int, length: int, seed: int) -> RawBatch:
    g = torch.Generator().manual_seed(seed)

    def ids(space: str, *shape: int) -> torch.Tensor:
        return torch.randint(1, SMALL_VOCAB[space] + 1, shape, generator=g)

    items = ids("item", batch_size, length)
    starts = torch.randint(0, length + 1, (batch_size,), generator=g)
    starts[0] = length  # one sample without any history
    items = items * (torch.arange(length)[None, :] >= starts[:, None])  # left-padded with 0
    cats = (items % SMALL_VOCAB["category"] + 1) * (items != 0)
    return RawBatch(
        labels=torch.randint(0, 2, (batch_size,), generator=g).float(), user_id=ids("user", batch_size),
        profile=torch.stack([ids(f"profile_{i}", batch_size) for i in range(1, 6)], dim=1),
        target_item=ids("item", batch_size), target_cat=ids("category", batch_size),
        item_city=ids("item_city", batch_size), item_province=ids("item_province", batch_size),
        history_items=items, history_cats=cats,
    )


@pytest.mark.parametrize("preset", ModelConfig.preset_names())
def test_gsu_stage_batches_train_every_preset(preset):
    cfg = ModelConfig.preset(preset, k=20)
    table = torch.randint(-127, 128, (SMALL_VOCAB["item"] + 1, 128), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    table[0] = 0
    batch = GsuStage(cfg, table)(_raw_batch(6, 90, seed=2))
    torch.manual_seed(0)
    model = build_model(cfg, SMALL_VOCAB)
    logits = model(batch)
    assert logits.shape == (6,) and torch.isfinite(logits).all()
    bce_loss(logits, batch.labels).backward()
    assert model.sequence_ec.embeddings["item"].weight.grad.abs().sum() > 0
