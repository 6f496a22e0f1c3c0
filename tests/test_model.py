"""ModelConfig, the embedding tables and the whole model: every preset forward/backward, meta construction."""

import dataclasses

import pytest
import torch
from torchrec.modules.embedding_configs import PoolingType

from datapipes.batch import HISTORY_FEATURES, SEQUENCE_FEATURES, SPARSE_FEATURES
from model.config import ModelConfig
from model.muse import MuseModel, build_model
from model.tables import embedding_configs
from model.train_module import MuseTrain, bce_loss
from tests.model_inputs import SMALL_VOCAB, random_batch

PRESETS = ModelConfig.preset_names()


def test_presets_cover_the_paper_baselines_and_ablations():
    expected = {
        "din": ("none", "ta"), "sim_hard": ("category", "ta"), "sim_soft": ("id", "ta"), "twin": ("attention", "ta"),
        "muse": ("multimodal", "sata+simtier"), "muse_ta": ("multimodal", "ta"), "muse_simtier": ("multimodal", "simtier"),
        "muse_ta_simtier": ("multimodal", "ta+simtier"), "muse_sata": ("multimodal", "sata"),
        "muse_sata_simtier": ("multimodal", "sata+simtier"), "muse_gsu_id": ("id", "sata+simtier"),
        "paper_din": ("none", "sata+simtier"), "paper_sim_hard": ("category", "sata+simtier"),
        "paper_sim_soft": ("id", "sata+simtier"), "paper_twin": ("attention", "sata+simtier"),
        "paper_muse": ("multimodal", "sata+simtier"),
        "muse_pq": ("multimodal", "sata+simtier"), "paper_muse_pq": ("multimodal", "sata+simtier"),
    }
    assert {name: (ModelConfig.preset(name).gsu, ModelConfig.preset(name).esu) for name in PRESETS} == expected
    cfg = ModelConfig.preset("muse", k=20)
    assert cfg.name == "muse" and cfg.k == 20 and cfg.num_tiers == 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"gsu": "faiss"}, "gsu"), ({"esu": "mean"}, "esu"), ({"activation": "relu"}, "activation"),
        ({"k": 0}, "k"), ({"id_dim": -1}, "id_dim"), ({"recent_len": 2.5}, "recent_len"),
        ({"tier_width": 0.3}, "tier_width"), ({"tier_width": 0.0}, "tier_width"), ({"mlp_dims": ()}, "mlp_dims"),
        ({"din_dims": (8, 0)}, "din_dims"), ({"simtier_recent": 1}, "simtier_recent"), ({"gsu": "attention", "esu": "simtier"}, "esu"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        ModelConfig(**overrides)


def test_config_round_trips_through_a_dict_and_rejects_unknown_names():
    cfg = ModelConfig.preset("twin", mlp_dims=(64, 32))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"name": "x", "heads": 4})
    with pytest.raises(ValueError, match="^name"):
        ModelConfig.preset("dlrm")


@pytest.mark.parametrize("preset, history", [("muse", False), ("twin", True), ("din", False), ("muse_gsu_id", True)])
def test_embedding_configs_share_one_table_per_id_space(preset, history):
    cfg = ModelConfig.preset(preset, id_dim=8)
    sequence, sparse = embedding_configs(cfg, SMALL_VOCAB)
    features = {**SEQUENCE_FEATURES, **(HISTORY_FEATURES if history else {})}
    assert {t.name: t.num_embeddings for t in sequence} == {"item": SMALL_VOCAB["item"] + 1, "category": SMALL_VOCAB["category"] + 1}
    assert {t.name: sorted(t.feature_names) for t in sequence} == {
        space: sorted(f for f, s in features.items() if s == space) for space in ("item", "category")
    }
    assert [t.feature_names for t in sparse] == [[f] for f in SPARSE_FEATURES]
    assert {t.name: t.num_embeddings for t in sparse} == {
        t.name: SMALL_VOCAB[t.name] + 1 for t in sparse
    } and sparse[0].name == "user"
    assert all(t.embedding_dim == 8 for t in sequence + sparse) and all(t.pooling == PoolingType.SUM for t in sparse)


def test_embedding_configs_reject_missing_or_bad_vocab_sizes():
    cfg = ModelConfig.preset("muse")
    with pytest.raises(ValueError, match=r"vocab_sizes\['item_city'\] is missing"):
        embedding_configs(cfg, {k: v for k, v in SMALL_VOCAB.items() if k != "item_city"})
    with pytest.raises(ValueError, match=r"vocab_sizes\['item'\]"):
        embedding_configs(cfg, {**SMALL_VOCAB, "item": 0})


def _rows_with_grad(weight: torch.nn.Parameter) -> set[int]:
    return set(torch.nonzero(weight.grad.abs().sum(1)).flatten().tolist())


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_forward_and_backward_to_the_id_tables(preset):
    cfg = ModelConfig.preset(preset)
    torch.manual_seed(0)
    model = build_model(cfg, SMALL_VOCAB)
    batch = random_batch(cfg, batch_size=8)
    logits = model(batch)
    assert logits.shape == (8,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    bce_loss(logits, batch.labels).backward()
    # Every parameter takes part (DDP needs no find_unused_parameters), and no parameter is multimodal.
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    item_rows = [n for n, p in model.named_parameters() if p.shape[0] == SMALL_VOCAB["item"] + 1]
    assert item_rows == ["sequence_ec.embeddings.item.weight"]
    for feature_space, used_features in (("item", ("target_item", "recent_item", "gsu_item", "hist_item")), ("category", ("target_cat", "recent_cat", "gsu_cat", "hist_cat"))):
        present = [f for f in used_features if f in batch.sequence_features.keys()]
        ids = set(torch.cat([batch.sequence_features[f].values() for f in present]).tolist())
        rows = _rows_with_grad(model.sequence_ec.embeddings[feature_space].weight)
        assert rows and rows <= ids and 0 not in rows
        assert set(batch.sequence_features["target_item" if feature_space == "item" else "target_cat"].values().tolist()) <= rows
    for table, feature in (("user", "user_id"), ("item_city", "item_city")):
        rows = _rows_with_grad(model.sparse_ebc.embedding_bags[table].weight)
        assert rows == set(batch.sparse_features[feature].values().tolist())


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_on_meta_with_the_cpu_state_dict_layout(preset):
    cfg = ModelConfig.preset(preset)
    meta = MuseModel(cfg, SMALL_VOCAB, device="meta")
    assert all(t.is_meta for t in meta.state_dict().values())
    cpu = {k: v.shape for k, v in build_model(cfg, SMALL_VOCAB).state_dict().items()}
    assert {k: v.shape for k, v in meta.state_dict().items()} == cpu


def _perturbed(batch, field, where):
    scores = getattr(batch, field)
    return dataclasses.replace(batch, **{field: torch.where(where, torch.rand_like(scores) * 2 - 1, scores)})


@pytest.mark.parametrize(
    "preset, uses_recent, uses_gsu",
    [("din", False, False), ("sim_hard", False, False), ("muse_sata", False, True), ("muse", True, True), ("muse_ta_simtier", True, True),
     ("paper_din", True, False), ("paper_sim_hard", True, True)],
)
def test_multimodal_scores_enter_only_where_the_switches_say_and_padding_never(preset, uses_recent, uses_gsu):
    cfg = ModelConfig.preset(preset)
    torch.manual_seed(0)
    model = build_model(cfg, SMALL_VOCAB).eval()
    batch = random_batch(cfg, batch_size=8)
    base = model(batch)
    for field, uses, feature in (("recent_scores", uses_recent, "recent_item"), ("gsu_scores", uses_gsu, "gsu_item")):
        lengths = batch.sequence_features[feature].lengths()
        valid = torch.arange(getattr(batch, field).shape[1])[None, :] < lengths[:, None]
        torch.testing.assert_close(model(_perturbed(batch, field, ~valid)), base)
        changed = model(_perturbed(batch, field, valid))
        assert not torch.allclose(changed, base) if uses else torch.equal(changed, base)


def test_score_widths_must_match_the_config():
    cfg = ModelConfig.preset("muse")
    model = build_model(cfg, SMALL_VOCAB)
    batch = random_batch(cfg, batch_size=4)
    with pytest.raises(ValueError, match=r"batch\.gsu_scores must be \[B, 50\]"):
        model(dataclasses.replace(batch, gsu_scores=batch.gsu_scores[:, :10]))
    with pytest.raises(ValueError, match=r"batch\.recent_scores"):
        model(dataclasses.replace(batch, recent_scores=batch.recent_scores[:, :10]))
    twin = ModelConfig.preset("twin")
    with pytest.raises(ValueError, match=r"batch\.history_scores"):
        build_model(twin, SMALL_VOCAB)(dataclasses.replace(random_batch(twin, batch_size=4), history_scores=None))


def test_train_module_returns_the_bce_loss_and_detached_outputs():
    cfg = ModelConfig.preset("muse", activation="prelu")
    torch.manual_seed(0)
    train = MuseTrain(build_model(cfg, SMALL_VOCAB))
    batch = random_batch(cfg, batch_size=6)
    loss, (loss_out, logits, labels) = train(batch)
    expected = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), labels)
    torch.testing.assert_close(loss, expected)
    assert loss.requires_grad and not loss_out.requires_grad and not logits.requires_grad and labels is batch.labels
