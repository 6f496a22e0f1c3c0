"""The ESU/GSU math of the model against direct formulas: SimTier, SA-TA / TA, DIN attention, in-model GSU."""

import math

import numpy as np
import pytest
import torch

from model.attention import DinAttention, TargetAttention, masked_softmax
from model.config import ModelConfig
from model.in_model_gsu import gather_positions, topk_positions
from model.jagged import behavior_values, length_mask, padded_behaviors
from model.muse import build_model
from model.tables import embedding_configs
from model.simtier import SimTier, tier_counts
from model.tower import Dice
from tests.model_inputs import SMALL_VOCAB, random_batch


def _edges(width: float) -> np.ndarray:
    tiers = round(2 / width)
    return (-1.0 + np.arange(tiers + 1) * width).astype(np.float32)


@pytest.mark.parametrize("width", [0.1, 0.25, 0.5, 2.0])
def test_simtier_counts_match_numpy_histogram(width):
    edges = _edges(width)
    rng = np.random.default_rng(0)
    b, n = 5, 60
    scores = rng.uniform(-1, 1, (b, n)).astype(np.float32)
    scores[0, : len(edges)] = edges  # every boundary, including -1 and +1, exactly
    scores[1, :4] = [-1.0, 1.0, -1.0, 1.0]
    lengths = np.array([n, 30, 0, 7, 45])
    mask = np.arange(n)[None, :] < lengths[:, None]
    got = tier_counts(torch.from_numpy(scores), torch.from_numpy(mask), len(edges) - 1, width)
    expected = np.stack([np.histogram(scores[i, mask[i]].astype(np.float64), bins=edges.astype(np.float64))[0] for i in range(b)])
    np.testing.assert_array_equal(got.numpy(), expected)
    assert got[2].sum() == 0 and got.sum(1).tolist() == lengths.tolist()


def test_simtier_boundaries_go_to_the_upper_tier_and_ends_are_closed():
    edges = _edges(0.1)
    scores = torch.from_numpy(edges).unsqueeze(0)  # [1, 21]
    counts = tier_counts(scores, torch.ones_like(scores, dtype=torch.bool), 20, 0.1)[0]
    # -1 and the 19 inner edges open tiers 0..19; +1 joins the last tier.
    assert counts.tolist() == [1.0] * 19 + [2.0]
    out_of_range = tier_counts(torch.tensor([[-1.5, 1.2]]), torch.tensor([[True, True]]), 20, 0.1)[0]
    assert out_of_range[0] == 1 and out_of_range[-1] == 1


def test_simtier_features_are_log1p_count_times_tier_vector():
    torch.manual_seed(0)
    module = SimTier(num_tiers=8, width=0.25, tier_dim=3)
    scores = torch.rand(4, 20) * 2 - 1
    mask = length_mask(torch.tensor([20, 5, 0, 13]), 20)
    counts = tier_counts(scores, mask, 8, 0.25)
    expected = torch.stack([(torch.log1p(counts[i])[:, None] * module.tier_vectors).flatten() for i in range(4)])
    torch.testing.assert_close(module(scores, mask), expected)
    padded = scores.masked_fill(~mask, 0.99)  # padding never counts, whatever its value
    torch.testing.assert_close(module(padded, mask), expected)


def _hand_attention_scores(module: TargetAttention, query, keys, similarity) -> np.ndarray:
    wq, bq = module.query.weight.detach().double().numpy(), module.query.bias.detach().double().numpy()
    wk = module.key.weight.detach().double().numpy()
    q = query.double().numpy() @ wq.T + bq  # [B, h]
    k = keys.double().numpy() @ wk.T  # [B, L, h]
    a_id = np.einsum("bh,blh->bl", q, k) / math.sqrt(wq.shape[0])
    if module.gates is None:
        return a_id
    g1, g2, g3 = module.gates.detach().double().numpy()
    r = similarity.double().numpy()
    return g1 * a_id + g2 * r + g3 * a_id * r


@pytest.mark.parametrize("similarity_aware", [True, False])
def test_target_attention_weights_match_the_formula(similarity_aware):
    torch.manual_seed(1)
    module = TargetAttention(dim=6, attention_dim=4, similarity_aware=similarity_aware)
    if similarity_aware:
        with torch.no_grad():
            module.gates.copy_(torch.tensor([0.7, -1.3, 2.1]))
    b, length = 4, 9
    query, keys = torch.randn(b, 6), torch.randn(b, length, 6)
    similarity = torch.rand(b, length) * 2 - 1
    mask = length_mask(torch.tensor([9, 4, 0, 1]), length)
    a = _hand_attention_scores(module, query, keys, similarity)
    expected = np.zeros((b, length))
    for i in range(b):
        valid = mask[i].numpy()
        if valid.any():
            e = np.exp(a[i, valid] - a[i, valid].max())
            expected[i, valid] = e / e.sum()
    weights = module.weights(query, keys, mask, similarity)
    np.testing.assert_allclose(weights.detach().double().numpy(), expected, rtol=1e-5, atol=1e-7)
    assert (weights[~mask] == 0).all()  # exactly zero, not merely small
    pooled = module(query, keys, mask, similarity)
    np.testing.assert_allclose(pooled.detach().double().numpy(), np.einsum("bl,ble->be", expected, keys.double().numpy()), rtol=1e-5, atol=1e-6)
    assert (pooled[2] == 0).all()
    # Whatever sits at invalid positions never reaches the output.
    noisy_keys = torch.where(mask[..., None], keys, torch.randn_like(keys) * 100)
    noisy_similarity = torch.where(mask, similarity, torch.ones_like(similarity))
    torch.testing.assert_close(module(query, noisy_keys, mask, noisy_similarity), pooled)


def test_similarity_aware_gates_receive_gradients():
    torch.manual_seed(2)
    module = TargetAttention(dim=6, attention_dim=4, similarity_aware=True)
    keys = torch.randn(3, 5, 6)
    module(torch.randn(3, 6), keys, torch.ones(3, 5, dtype=torch.bool), torch.rand(3, 5)).pow(2).sum().backward()
    assert module.gates.grad is not None and (module.gates.grad != 0).all()


def test_masked_softmax_of_an_all_invalid_row_is_zero_and_finite_in_backward():
    scores = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[True, False, True, False], [False] * 4])
    weights = masked_softmax(scores, mask)
    assert weights[1].eq(0).all() and torch.allclose(weights[0].sum(), torch.tensor(1.0))
    (weights * torch.randn(2, 4)).sum().backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[~mask] == 0).all()


@pytest.mark.parametrize("activation", ["dice", "prelu"])
def test_din_attention_masks_padding_and_matches_per_sample_softmax(activation):
    torch.manual_seed(3)
    module = DinAttention(dim=4, hidden=(8, 6), activation=activation).eval()
    lengths = torch.tensor([3, 0, 5, 1])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    query, keys = torch.randn(4, 4), torch.randn(int(lengths.sum()), 4)
    weights = module.weights(query, keys, lengths, offsets, length=6)
    pooled = module(query, keys, lengths, offsets, length=6)
    for i in range(4):
        rows = keys[offsets[i] : offsets[i + 1]]
        q = query[i].expand_as(rows)
        scores = module.score(module.mlp(torch.cat([q, rows, q - rows, q * rows], 1))).squeeze(-1)
        expected = torch.softmax(scores, 0)
        torch.testing.assert_close(weights[i, : lengths[i]], expected)
        assert (weights[i, lengths[i] :] == 0).all()
        torch.testing.assert_close(pooled[i], expected @ rows if len(rows) else torch.zeros(4))


def test_topk_positions_match_brute_force():
    rng = np.random.default_rng(4)
    b, length, k = 6, 40, 7
    relevance = rng.standard_normal((b, length)).astype(np.float32)
    lengths = np.array([40, 7, 3, 0, 1, 25])
    mask = np.arange(length)[None, :] < lengths[:, None]
    relevance[~mask] = 50.0  # padding must lose even with the largest score
    positions, valid = topk_positions(torch.from_numpy(relevance), torch.from_numpy(mask), k)
    assert positions.shape == (b, k) and valid.shape == (b, k)
    for i in range(b):
        candidates = np.flatnonzero(mask[i])
        expected = candidates[np.argsort(-relevance[i, candidates], kind="stable")][:k]
        n = min(k, lengths[i])
        assert valid[i].tolist() == [True] * n + [False] * (k - n)
        assert positions[i, :n].tolist() == expected.tolist()
    short, short_valid = topk_positions(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool), k)
    assert short.shape == (2, 3) and short_valid.all()
    with pytest.raises(ValueError, match="k"):
        topk_positions(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool), 0)


def _history_ids(batch, feature):
    jt = batch.sequence_features[feature]
    return [ids.tolist() for ids in torch.split(jt.values(), jt.lengths().tolist())]


@pytest.mark.parametrize("preset", ["sim_soft", "twin"])
def test_in_model_gsu_selects_the_brute_force_top_k_of_the_history(preset):
    cfg = ModelConfig.preset(preset, k=10)
    torch.manual_seed(5)
    model = build_model(cfg, SMALL_VOCAB)
    batch = random_batch(cfg, batch_size=5, history_len=30, seed=6)
    item_table = model.sequence_ec.embeddings["item"].weight.detach().double()
    cat_table = model.sequence_ec.embeddings["category"].weight.detach().double()
    embeddings = model.sequence_ec(batch.sequence_features)
    target = behavior_values(embeddings["target_item"], embeddings["target_cat"])
    with torch.no_grad():
        behaviors, mask, similarity = model.interest_arch._select_from_history(target, embeddings, batch.history_scores)
    attention = model.interest_arch.esu.attention
    items, cats = _history_ids(batch, "hist_item"), _history_ids(batch, "hist_cat")
    targets = batch.sequence_features["target_item"].values(), batch.sequence_features["target_cat"].values()
    for i in range(5):
        t = torch.cat([item_table[targets[0][i]], cat_table[targets[1][i]]])
        hist = torch.cat([item_table[items[i]], cat_table[cats[i]]], dim=1)  # [n, E]
        if preset == "sim_soft":
            relevance = hist @ t
        else:
            relevance = torch.from_numpy(_hand_attention_scores(attention, t.float()[None], hist.float()[None], batch.history_scores[i : i + 1, : len(hist)])[0])
        order = torch.argsort(relevance, descending=True, stable=True)[: cfg.k]
        n = len(order)
        assert mask[i].tolist() == [True] * n + [False] * (cfg.k - n)
        torch.testing.assert_close(behaviors[i, :n].double(), hist[order], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(similarity[i, :n], batch.history_scores[i, order])
        assert (similarity[i, n:] == 0).all()


def test_gather_positions_on_2d_and_3d():
    values = torch.arange(24.0).view(2, 4, 3)
    positions = torch.tensor([[3, 0], [1, 1]])
    assert gather_positions(values, positions).tolist() == [[values[0, 3].tolist(), values[0, 0].tolist()], [values[1, 1].tolist()] * 2]
    assert gather_positions(values[..., 0], positions).tolist() == [[9.0, 0.0], [15.0, 15.0]]


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _linear(layer, x: np.ndarray) -> np.ndarray:
    return x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()


def test_r_temperature_divides_r_and_is_learned():
    torch.manual_seed(7)
    plain = TargetAttention(dim=6, attention_dim=4, similarity_aware=True)
    torch.manual_seed(7)
    tempered = TargetAttention(dim=6, attention_dim=4, similarity_aware=True, r_temperature=0.1)
    assert float(tempered.temperature.detach()) == pytest.approx(0.1)
    with torch.no_grad():
        for module in (plain, tempered):
            module.gates.copy_(torch.tensor([0.7, -1.3, 2.1]))
        tempered.temperature.fill_(0.25)  # the learned value, not the initial one, divides R
    query, keys, similarity = torch.randn(3, 6), torch.randn(3, 5, 6), torch.rand(3, 5) * 2 - 1
    torch.testing.assert_close(tempered.scores(query, keys, similarity), plain.scores(query, keys, similarity / 0.25))
    a_id = plain.id_scores(query, keys)
    # R's own term grows by 1/temperature; a_id's does not.
    torch.testing.assert_close(tempered.scores(query, keys, similarity) - plain.scores(query, keys, similarity),
                               -1.3 * similarity * 3 + 2.1 * a_id * similarity * 3)
    mask = torch.ones(3, 5, dtype=torch.bool)
    tempered(query, keys, mask, similarity).pow(2).sum().backward()
    assert tempered.temperature.grad is not None and tempered.temperature.grad != 0


def test_projections_apply_silu_query_key_value_and_pool_the_values():
    torch.manual_seed(8)
    module = TargetAttention(dim=6, attention_dim=4, similarity_aware=True, r_temperature=0.1, projections=True)
    with torch.no_grad():
        module.gates.copy_(torch.tensor([0.5, 1.5, -0.8]))
    b, length = 4, 7
    query, keys, similarity = torch.randn(b, 6), torch.randn(b, length, 6), torch.rand(b, length) * 2 - 1
    mask = length_mask(torch.tensor([7, 3, 0, 1]), length)
    q = _silu(_linear(module.query, query.double().numpy()))  # [B, 4]
    k = _silu(_linear(module.key, keys.double().numpy()))  # [B, L, 4]
    v = _silu(_linear(module.value, keys.double().numpy()))  # [B, L, 6]
    a_id = np.einsum("bh,blh->bl", q, k)  # unscaled, as the released SA-TA
    r = similarity.double().numpy() / 0.1
    a = 0.5 * a_id + 1.5 * r - 0.8 * a_id * r
    np.testing.assert_allclose(module.scores(query, keys, similarity).detach().double().numpy(), a, rtol=1e-5, atol=1e-6)
    expected = np.zeros((b, 6))
    for i in range(b):
        valid = mask[i].numpy()
        if valid.any():
            e = np.exp(a[i, valid] - a[i, valid].max())
            expected[i] = (e / e.sum()) @ v[i, valid]
    np.testing.assert_allclose(module(query, keys, mask, similarity).detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # Released initialisation of the projections: bias 0.1, weights of std 1/sqrt(in).
    big = TargetAttention(dim=256, attention_dim=256, similarity_aware=False, projections=True)
    assert (big.query.bias == 0.1).all() and (big.value.bias == 0.1).all()
    assert float(big.key.weight.std()) == pytest.approx(1 / 16, rel=0.05)


def test_default_attention_has_no_new_parameters():
    names = {n for n, _ in TargetAttention(dim=6, attention_dim=4, similarity_aware=True).named_parameters()}
    assert names == {"query.weight", "query.bias", "key.weight", "gates"}
    cfg = ModelConfig.preset("muse")
    assert cfg.r_temperature is None and not cfg.attention_projections and cfg.embedding_init_std is None


def test_paper_presets_are_one_model_where_only_the_gsu_changes():
    paper = {name: ModelConfig.preset(name) for name in ModelConfig.PAPER_PRESETS}
    assert {name: cfg.gsu for name, cfg in paper.items()} == {
        "paper_din": "none", "paper_sim_hard": "category", "paper_sim_soft": "id", "paper_twin": "attention",
        "paper_muse": "multimodal",
    }
    shared = [{k: v for k, v in cfg.to_dict().items() if k not in ("name", "gsu")} for cfg in paper.values()]
    assert all(s == shared[0] for s in shared)
    muse = paper["paper_muse"]
    assert (muse.esu, muse.r_temperature, muse.attention_projections, muse.mlp_dims) == ("sata+simtier", 0.1, True, (256, 128, 64))
    sequence, sparse = embedding_configs(muse, SMALL_VOCAB)
    bound = math.sqrt(3) * 1e-3
    assert all((t.weight_init_min, t.weight_init_max) == pytest.approx((-bound, bound)) for t in sequence + sparse)
    table = build_model(muse, SMALL_VOCAB).sequence_ec.embeddings["item"].weight
    assert float(table.std()) == pytest.approx(1e-3, rel=0.1)


def test_paper_din_keeps_only_the_recent_simtier_and_the_id_din_none():
    paper_din = build_model(ModelConfig.preset("paper_din"), SMALL_VOCAB).interest_arch.esu
    assert paper_din.attention is None and paper_din.simtier is None and paper_din.recent_simtier is not None
    assert build_model(ModelConfig.preset("din"), SMALL_VOCAB).interest_arch.esu is None


def test_paper_twin_selects_by_the_attention_id_score_not_by_r():
    cfg = ModelConfig.preset("paper_twin", k=5)
    torch.manual_seed(9)
    model = build_model(cfg, SMALL_VOCAB)
    batch = random_batch(cfg, batch_size=4, history_len=30, seed=10)
    embeddings = model.sequence_ec(batch.sequence_features)
    target = behavior_values(embeddings["target_item"], embeddings["target_cat"])
    with torch.no_grad():
        behaviors, mask, similarity = model.interest_arch._select_from_history(target, embeddings, batch.history_scores)
        flipped = model.interest_arch._select_from_history(target, embeddings, -batch.history_scores)
    torch.testing.assert_close(flipped[0], behaviors)
    torch.testing.assert_close(flipped[2], -similarity)
    history, history_mask = padded_behaviors(embeddings["hist_item"], embeddings["hist_cat"], batch.history_scores.shape[1])
    with torch.no_grad():
        relevance = model.interest_arch.esu.attention.id_scores(target, history).masked_fill(~history_mask, float("-inf"))
        chosen = model.interest_arch.esu.attention.id_scores(target, behaviors)
    for i in range(4):
        n = int(mask[i].sum())
        assert n == min(cfg.k, int(history_mask[i].sum()))
        # The chosen behaviors carry the n highest ID scores (repeated items tie, so compare scores, not positions).
        torch.testing.assert_close(chosen[i, :n], relevance[i].sort(descending=True).values[:n])


def test_dice_in_eval_is_the_running_statistics_formula():
    """Eval's fused Dice equals p x + (1 - p) alpha x with p = sigmoid(batchnorm with running statistics)."""
    dice = _dice_with_statistics(6, seed=5)
    x = torch.randn(40, 6)
    p = torch.sigmoid((x - dice.norm.running_mean) / torch.sqrt(dice.norm.running_var + dice.norm.eps))
    torch.testing.assert_close(dice.eval()(x), p * x + (1 - p) * dice.alpha * x, rtol=1e-6, atol=1e-6)
    batch = torch.sigmoid((x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + dice.norm.eps))
    torch.testing.assert_close(dice.train()(x), batch * x + (1 - batch) * dice.alpha * x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation,hidden", [("dice", (8, 6)), ("prelu", (8, 6)), ("dice", ()), ("dice", (13, 16, 5))])
@pytest.mark.parametrize("keys_count", [0, 1, 7])
@pytest.mark.parametrize("native", [True, False])
def test_din_shared_keys_equal_the_jagged_attention_with_the_keys_repeated(activation, hidden, keys_count, native,
                                                                          monkeypatch):
    """forward_shared(query [B, E], keys [R, E]) = forward of B samples each holding the same R keys: through the C
    kernel (model.din_native: Dice MLPs, widths padded to multiples of 8, pairs in tiles that cross queries) and
    through the torch blocks (also when the queries are split into several blocks, SHARED_PAIRS small); for R = 0
    zeros; training mode is refused."""
    import model.attention as attention
    from model import din_native
    from model.gsu import cbuild

    if native and din_native.LIBRARY.function("muse_din_scores") is None:
        pytest.skip(f"no native kernel here: {din_native.LIBRARY.reason()}")
    if not native:
        monkeypatch.setattr(din_native, "LIBRARY", cbuild.Library.absent("test: no compiler"))
    monkeypatch.setattr(attention, "SHARED_PAIRS", 10)  # blocks of 10 // R queries: several blocks and a short one
    torch.manual_seed(11)
    module = DinAttention(dim=4, hidden=hidden, activation=activation)
    for layer in module.mlp:
        if hasattr(layer, "norm"):
            layer.norm.running_mean.uniform_(-1, 1)
            layer.norm.running_var.uniform_(0.5, 2.0)
            layer.alpha.data.uniform_(-0.5, 0.5)
    module.eval()
    b = 9
    query, keys = torch.randn(b, 4), torch.randn(keys_count, 4)
    if keys_count > 2:
        keys[2] = keys[0]  # a behavior repeated in the window: scored once, counted at both positions
    lengths = torch.full((b,), keys_count)
    offsets = torch.arange(b + 1) * keys_count
    expected = module(query, keys.repeat(b, 1), lengths, offsets, length=max(keys_count, 1))
    torch.testing.assert_close(module.forward_shared(query, keys), expected, rtol=1e-6, atol=1e-6)
    weights = module.shared_weights(query, keys)
    assert weights.shape == (b, keys_count)
    if keys_count:
        torch.testing.assert_close(weights.sum(1), torch.ones(b))
    with pytest.raises(RuntimeError, match="inference only"):
        module.train().shared_weights(query, keys)


def test_din_native_kernel_follows_changed_weights_and_statistics():
    """The kernel's prepared weights are rebuilt when a parameter or running statistic changes in place."""
    from model import din_native

    if din_native.LIBRARY.function("muse_din_scores") is None:
        pytest.skip(f"no native kernel here: {din_native.LIBRARY.reason()}")
    torch.manual_seed(3)
    module = DinAttention(dim=4, hidden=(8,), activation="dice").eval()
    query, keys = torch.randn(5, 4), torch.randn(3, 4)
    before = din_native.scores(module, query, keys)
    with torch.no_grad():
        module.mlp[1].norm.running_mean.add_(0.5)
        module.score.weight.mul_(2)
    lengths, offsets = torch.full((5,), 3), torch.arange(6) * 3
    expected = module(query, keys.repeat(5, 1), lengths, offsets, length=3)
    torch.testing.assert_close(module.forward_shared(query, keys), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(din_native.scores(module, query, keys), before)


@pytest.mark.parametrize("projections", [False, True])
@pytest.mark.parametrize("similarity_aware", [False, True])
def test_target_attention_over_shared_behaviors_equals_the_gathered_behaviors(projections, similarity_aware):
    """forward_shared(query, distinct [U, E], index [B, K]) = forward over behaviors distinct[index] (masked where the
    index is -1; projections taken once per distinct behavior); no behavior at all pools to zeros."""
    torch.manual_seed(4)
    module = TargetAttention(6, 5, similarity_aware, r_temperature=0.3 if similarity_aware else None,
                             projections=projections).eval()
    if module.gates is not None:
        module.gates.data.uniform_(0.5, 1.5)
    b, k, u = 7, 4, 9
    query, distinct = torch.randn(b, 6), torch.randn(u, 6)
    index = torch.randint(0, u, (b, k))
    index[1, 2:] = -1
    index[3] = -1
    mask, similarity = index >= 0, torch.rand(b, k) * (index >= 0)
    with torch.no_grad():
        expected = module(query, distinct[index.clamp_min(0)], mask, similarity)
        got = module.forward_shared(query, distinct, index, mask, similarity)
        empty = module.forward_shared(query, distinct[:0], torch.full((b, k), -1), torch.zeros(b, k, dtype=torch.bool),
                                      torch.zeros(b, k))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[3], torch.zeros(6)) and torch.equal(empty, torch.zeros(b, 6))


@pytest.mark.parametrize("native", [True, False])
def test_dice_apply_in_place_equals_eval_forward_and_refuses_training(native, monkeypatch):
    """Dice.apply_ (in place): the C kernel equals eval forward to 1e-6 over a wide range of inputs (|x| up to 60,
    saturated sigmoids), a width with a scalar tail (13 = 8 + 5) and strided rows; without it, the same torch ops
    bit for bit."""
    from model import dice_native
    from model.gsu import cbuild

    if native and dice_native.LIBRARY.function("muse_dice_") is None:
        pytest.skip(f"no native kernel here: {dice_native.LIBRARY.reason()}")
    if not native:
        monkeypatch.setattr(dice_native, "LIBRARY", cbuild.Library.absent("test: no compiler"))
    dice = _dice_with_statistics(13, seed=6)
    x = torch.cat([torch.randn(300, 13), torch.randn(40, 13) * 30])
    expected = dice.eval()(x)
    wide = torch.zeros(x.shape[0], 20)
    buffer = wide[:, 2:15]  # rows strided by 20, columns contiguous
    buffer.copy_(x)
    assert dice.apply_(buffer, torch.empty_like(x)).data_ptr() == buffer.data_ptr()
    if native:
        torch.testing.assert_close(buffer, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(buffer, expected)
    assert (wide[:, :2] == 0).all() and (wide[:, 15:] == 0).all()
    with pytest.raises(RuntimeError, match="inference only"):
        dice.train().apply_(x.clone(), torch.empty_like(x))


@pytest.mark.parametrize("preset", ["muse", "paper_muse", "din"])
def test_model_with_the_recent_window_given_once_equals_it_repeated_in_every_sample(preset):
    """MuseModel.forward(batch, shared_recent=True), the recent features once in sample 0, gives the logits of the
    batch that repeats that window in every sample (what MuseModel.rank_user computes from ids)."""
    from datapipes.batch import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    cfg = ModelConfig.preset(preset)
    torch.manual_seed(2)
    model = build_model(cfg, SMALL_VOCAB).eval()
    batch = random_batch(cfg, batch_size=6, seed=4)
    seq = batch.sequence_features.to_dict()
    window = 5
    shared = {"recent_item": torch.randint(1, SMALL_VOCAB["item"] + 1, (window,)),
              "recent_cat": torch.randint(1, SMALL_VOCAB["category"] + 1, (window,))}

    def with_recent(lengths: torch.Tensor, repeat: int) -> Batch:
        values, all_lengths = [], []
        for key in batch.sequence_features.keys():
            if key in shared:
                values.append(shared[key].repeat(repeat))
                all_lengths.append(lengths)
            else:
                values.append(seq[key].values())
                all_lengths.append(seq[key].lengths())
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=batch.sequence_features.keys(), values=torch.cat(values),
                                                  lengths=torch.cat(all_lengths))
        return Batch(sparse_features=batch.sparse_features, sequence_features=kjt, labels=batch.labels,
                     recent_scores=batch.recent_scores, gsu_scores=batch.gsu_scores, history_scores=batch.history_scores)

    repeated = with_recent(torch.full((6,), window), 6)
    once = with_recent(torch.tensor([window, 0, 0, 0, 0, 0]), 1)
    with torch.no_grad():
        torch.testing.assert_close(model(once, shared_recent=True), model(repeated), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("width", [0.1, 0.05, 2.0 / 7, 0.5])
def test_tiers_of_equals_bucketize_on_edges_neighbours_and_outliers(width):
    """The arithmetic tiering gives torch.bucketize's tiers exactly: at every edge, one float32 ulp either side of
    it, at -1, 1, beyond them, at +-inf and NaN (last tier, as bucketize), and on random scores."""
    from model.simtier import tier_edges, tiers_of

    num_tiers = round(2.0 / width)
    edges = tier_edges(num_tiers, width)
    near = torch.cat([edges, torch.nextafter(edges, torch.full_like(edges, 2.0)),
                      torch.nextafter(edges, torch.full_like(edges, -2.0))])
    scores = torch.cat([near, torch.tensor([-1.0, 1.0, -1.5, 1.5, -0.0, 0.0, -100.0, 100.0, torch.inf, -torch.inf,
                                            torch.nan]),
                        torch.rand(5000, generator=torch.Generator().manual_seed(1)) * 2.2 - 1.1]).view(-1, 1)
    assert torch.equal(tiers_of(scores, num_tiers, width), torch.bucketize(scores, edges, right=True))


def test_pad_values_of_full_samples_is_a_view_equal_to_the_padding_kernel():
    from model.jagged import pad_values

    values = torch.randn(12, 3)
    full = torch.arange(5) * 3  # 4 samples of exactly 3 values
    padded = pad_values(values, full, 3)
    assert padded.data_ptr() == values.data_ptr()
    assert torch.equal(padded, torch.ops.fbgemm.jagged_to_padded_dense(values, [full], [3], 0.0))
    ragged = torch.tensor([0, 3, 5, 9, 12])
    expected = torch.zeros(4, 4, 3)
    for i in range(4):
        expected[i, : ragged[i + 1] - ragged[i]] = values[ragged[i]:ragged[i + 1]]
    assert torch.equal(pad_values(values, ragged, 4), expected)



@pytest.mark.parametrize("native", [True, False])
def test_eval_dice_without_autograd_never_writes_its_input(native, monkeypatch):
    """Eval Dice under no_grad (the C kernel on a contiguous copy, or the torch ops): the caller's x is left as it
    was, for a transposed, an expanded and a float64 input too, and the result equals the formula."""
    from model import dice_native
    from model.gsu import cbuild

    if not native:
        monkeypatch.setattr(dice_native, "LIBRARY", cbuild.Library.absent("test: no compiler"))
    dice = _dice_with_statistics(6, seed=7)
    dice.eval()
    for x in (torch.randn(9, 6), torch.randn(6, 9).t(), torch.randn(1, 6).expand(9, 6), torch.randn(9, 6).double()):
        module = dice.double() if x.dtype == torch.float64 else dice.float()
        before = x.clone()
        with torch.no_grad():
            y = module(x)
        assert torch.equal(x, before)
        p = torch.sigmoid((x - module.norm.running_mean) / torch.sqrt(module.norm.running_var + module.norm.eps))
        torch.testing.assert_close(y, p * x + (1 - p) * module.alpha * x, rtol=1e-6, atol=1e-6)


def _dice_with_statistics(dim: int, seed: int):
    """A Dice(dim) whose running mean, running variance and alpha are drawn (seeded), not the initial 0 / 1 / 0."""
    from model.tower import Dice

    torch.manual_seed(seed)
    dice = Dice(dim)
    dice.norm.running_mean.uniform_(-1, 1)
    dice.norm.running_var.uniform_(0.5, 2.0)
    dice.alpha.data.uniform_(-0.5, 0.5)
    return dice


@pytest.mark.parametrize("bias", [True, False])
def test_folded_linear_equals_the_linear_of_the_concatenated_columns(bias):
    """folded_linear over Dense / Shared / Tiers blocks = Linear(concatenated blocks) to float32 rounding, whatever
    the order of the blocks; a block list of the wrong width is refused."""
    from model.columns import Dense, Shared, Tiers, concatenated, folded_linear

    torch.manual_seed(11)
    rows = 9
    blocks = [Shared(torch.randn(5)), Dense(torch.randn(rows, 3)), Tiers(torch.rand(rows, 4), torch.randn(4, 2)),
              Shared(torch.randn(2)), Tiers(torch.rand(rows, 3), torch.randn(3, 1)), Dense(torch.randn(rows, 6))]
    width = sum(b.width for b in blocks)
    linear = torch.nn.Linear(width, 7, bias=bias)
    expected = linear(concatenated(blocks, rows))
    torch.testing.assert_close(folded_linear(linear, blocks, rows), expected, rtol=1e-5, atol=1e-5)
    only_shared = [Shared(torch.randn(width))]
    torch.testing.assert_close(folded_linear(linear, only_shared, rows), linear(concatenated(only_shared, rows)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="columns"):
        folded_linear(linear, blocks[1:], rows)
    with pytest.raises(ValueError, match="Dense block of 10 rows for 9"):
        folded_linear(linear, blocks[:1] + [Dense(torch.randn(rows + 1, 3))] + blocks[2:], rows)


def test_rank_user_checks_its_ids_and_ranks_no_candidate_to_an_empty_answer():
    cfg = ModelConfig.preset("muse")
    model = build_model(cfg, SMALL_VOCAB).eval()
    ids = torch.ones(1, dtype=torch.int64)
    sparse = {name: ids for name in ("user_id", "profile_1", "profile_2", "profile_3", "profile_4", "profile_5",
                                     "item_city", "item_province")}
    none = torch.zeros(0, dtype=torch.int64)
    sequence = {"target_item": none, "target_cat": none, "recent_item": ids, "recent_cat": ids, "gsu_item": ids,
                "gsu_cat": ids}
    empty = model.rank_user(sparse, sequence, torch.zeros(0, cfg.recent_len), torch.zeros(0, cfg.k),
                            torch.zeros(0, cfg.k, dtype=torch.int64))
    assert empty.shape == (0,)
    two = torch.ones(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="target_item"):
        model.rank_user(sparse, {**sequence, "target_item": two, "target_cat": two}, torch.zeros(3, cfg.recent_len),
                        torch.zeros(3, cfg.k), torch.zeros(3, cfg.k, dtype=torch.int64))
    with pytest.raises(ValueError, match="item_city"):
        model.rank_user({**sparse, "item_city": two}, {**sequence, "target_item": ids.repeat(3),
                                                        "target_cat": ids.repeat(3)},
                        torch.zeros(3, cfg.recent_len), torch.zeros(3, cfg.k), torch.zeros(3, cfg.k, dtype=torch.int64))


def test_distinct_rows_gives_each_row_back_and_survives_a_hash_collision(monkeypatch):
    """Every row is distinct[slot] bit for bit, one distinct row per distinct bit pattern; when every row hashes the
    same (multipliers forced to 0), the check fails and torch.unique's answer comes back."""
    from model import attention

    torch.manual_seed(12)
    base = torch.randn(6, 5)
    rows = base[torch.tensor([0, 3, 3, 1, 0, 5, 2, 3])]
    distinct, slot = attention.distinct_rows(rows)
    assert torch.equal(distinct.index_select(0, slot), rows) and distinct.shape[0] == 5
    monkeypatch.setattr(attention, "_row_multipliers", lambda width: torch.zeros(width, dtype=torch.int64))
    distinct, slot = attention.distinct_rows(rows)
    assert torch.equal(distinct.index_select(0, slot), rows) and distinct.shape[0] == 5


def test_dice_eval_parameters_follow_changed_statistics_and_alpha():
    """Under inference mode the eval parameters are kept, and built again when a running statistic or alpha changes
    in place or is replaced; outside it (training, evaluation) they are built on every call, so a write through
    ``.data`` (no version counter) is seen too."""
    dice = Dice(3).eval()
    with torch.inference_mode():
        first = dice.eval_parameters()
        assert dice.eval_parameters() is first  # kept while nothing changed
    with torch.no_grad():
        dice.norm.running_var.mul_(4)
        dice.alpha.fill_(0.25)
    with torch.inference_mode():
        changed = dice.eval_parameters()
    torch.testing.assert_close(changed[0], torch.full((3,), 0.5), rtol=1e-3, atol=1e-3)  # 1 / sqrt(4 + eps)
    torch.testing.assert_close(changed[2], torch.full((3,), 0.25))
    dice.alpha = torch.nn.Parameter(torch.full((3,), 0.5))
    with torch.inference_mode():
        torch.testing.assert_close(dice.eval_parameters()[3], torch.full((3,), 0.5))
    dice.alpha.data.fill_(0.75)  # bypasses the version counter: seen outside inference mode
    torch.testing.assert_close(dice.eval_parameters()[2], torch.full((3,), 0.75))


def test_a_model_built_under_inference_mode_still_runs_its_eval_kernels():
    """Inference tensors have no version counter: nothing is cached for them, and the eval paths still run."""
    cfg = ModelConfig.preset("muse")
    with torch.inference_mode():
        model = build_model(cfg, SMALL_VOCAB).eval()
        assert model(random_batch(cfg, batch_size=3, history_len=30, seed=7)).shape == (3,)
        din = DinAttention(4, (8,), "dice").eval()
        query, keys = torch.randn(5, 4), torch.randn(3, 4)
        assert din.forward_shared(query, keys).shape == (5, 4)
        assert Dice(3).eval()(torch.randn(2, 3)).shape == (2, 3)
    assert sum(p.is_inference() for p in model.parameters()) > 0
