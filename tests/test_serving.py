"""``muse serve``: ``Predictor.rank_indices`` and the engine's scores equal ``Predictor.score`` (with and without a
prefetch, with side features), a package older than ``rank_indices`` still serves, the benchmark's own package,
request validation, the prefetch cache and metrics in process; then a real server on a loopback port (2
workers): real requests, every error class a 4xx with one message while the server stays up, a reload under
load, and a graceful SIGTERM with requests in flight."""

import argparse
import dataclasses
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.errors import UserError
from datapipes.prepared import PreparedDataset
from inference import load_predictor
from inference.export import export_package
from inference.predict import RawIds
from model.config import ModelConfig
from serving.cache import PrefetchCache
from serving.engine import Engine, load_engine
from serving.metrics import LAYOUT, Metrics
from serving.schema import BadRequest, Limits, parse_object, rank_request
from test_datapipes_reader import _alive
from test_inference import make_run

VENV_BIN = os.path.dirname(sys.executable)
MAX_CANDIDATES, MAX_BODY = 1500, 1_000_000
ENGINE_CONFIG = SimpleNamespace(cache_bytes=1 << 26, cache_users=100)


@pytest.fixture(scope="module")
def packages(prepared_dataset, tmp_path_factory):
    """(package served, with its test-split store beside it; a second package of other weights)."""
    root = tmp_path_factory.mktemp("serve")
    first = str(root / "model.pt")
    export_package(make_run(root / "seed-0", prepared_dataset, "muse", seed=0), first, histories="test")
    second = str(root / "other.pt")
    export_package(make_run(root / "seed-1", prepared_dataset, "muse", seed=1), second)
    return first, second


@pytest.fixture(scope="module")
def users(prepared_dataset):
    """Raw ids of test users with histories: [(raw user id, user index)], RawIds, raw item ids of the vocabulary."""
    dataset = PreparedDataset.open(prepared_dataset)
    store, raw_ids = dataset.histories("test"), RawIds(dataset)
    lengths = store.offsets[:, 1] - store.offsets[:, 0]
    chosen = np.argsort(-lengths)[:4]
    out = [(int(raw_ids("user", torch.tensor([int(u)]))[0]), int(u)) for u in chosen if lengths[u] > 0]
    items = raw_ids("item", torch.arange(1, dataset.metadata.vocab_sizes["item"] + 1))
    return out, raw_ids, items


def _candidates(items: torch.Tensor, n: int, seed: int) -> list:
    """``n - 2`` random known items (with repeats when the vocabulary is smaller), an unknown id and the padding id."""
    picks = items[torch.randint(0, items.numel(), (n - 2,), generator=torch.Generator().manual_seed(seed))]
    return picks.tolist() + [987654321, 0]


def _reference(predictor, raw_ids, user_index: int, raw_user: int, candidates: list, side=None) -> torch.Tensor:
    """``Predictor.score`` of each candidate with the user's stored profile and history (raw ids)."""
    user, profile, items, cats = predictor.user_history(raw_user)
    assert int(user[0]) == user_index
    c = len(candidates)
    prof = torch.stack([raw_ids(f"profile_{i + 1}", profile[i:i + 1]) for i in range(5)], 1).expand(c, -1)
    hist_items, hist_cats = raw_ids("item", items), raw_ids("category", cats)
    side = side or {}
    return predictor.score(torch.full((c,), raw_user), prof, torch.tensor(candidates),
                           hist_items[None, :].expand(c, -1), hist_cats[None, :].expand(c, -1),
                           target_cat=side.get("candidate_categories"), item_city=side.get("candidate_cities"),
                           item_province=side.get("candidate_provinces"))


def _explicit(predictor, raw_ids, raw_user: int) -> dict:
    """A rank request body giving the user's history and profile explicitly, in raw ids."""
    _, profile, items, cats = predictor.user_history(raw_user)
    return {"user_id": raw_user, "history_items": raw_ids("item", items).tolist(),
            "history_categories": raw_ids("category", cats).tolist(),
            "profile": {f"profile_{i + 1}": int(raw_ids(f"profile_{i + 1}", profile[i:i + 1])[0]) for i in range(5)}}


# ---- in process ----


def test_engine_scores_equal_predictor_score_with_and_without_prefetch(packages, users):
    package, _ = packages
    predictor = load_predictor(package)
    engine = load_engine(package, None, ENGINE_CONFIG, generation=1)
    assert engine.info.mm_table_mapped and engine.local_gsu
    limits = Limits(1000, 10_000)
    chosen, raw_ids, items = users
    for seed, (raw_user, index) in enumerate(chosen):
        candidates = _candidates(items, 40, seed)
        expected = _reference(predictor, raw_ids, index, raw_user, candidates)
        cold, facts = engine.rank(rank_request({"user_id": raw_user, "candidates": candidates}, limits))
        assert facts["cache"] == "miss"
        rows, cached = engine.prefetch(raw_user)
        assert not cached and rows.local is not None and rows.local.rows.shape[0] <= rows.items.shape[0] + 1
        warm, facts = engine.rank(rank_request({"user_id": raw_user, "candidates": candidates}, limits))
        assert facts["cache"] == "hit"
        explicit, facts = engine.rank(rank_request({**_explicit(predictor, raw_ids, raw_user),
                                                    "candidates": candidates}, limits))
        assert facts["cache"] == "none"
        for got in (cold, warm, explicit):
            assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    # side features override the package's item attributes
    raw_user, index = chosen[0]
    candidates = _candidates(items, 20, 7)
    side = {"candidate_categories": raw_ids("category", torch.randint(1, 10, (20,))),
            "candidate_cities": torch.zeros(20, dtype=torch.int64),
            "candidate_provinces": torch.full((20,), 55555, dtype=torch.int64)}
    got, _ = engine.rank(rank_request({"user_id": raw_user, "candidates": candidates,
                                       **{k: v.tolist() for k, v in side.items()}}, limits))
    assert torch.allclose(got, _reference(predictor, raw_ids, index, raw_user, candidates, side), atol=1e-6, rtol=0)
    assert not torch.allclose(got, _reference(predictor, raw_ids, index, raw_user, candidates), atol=1e-6, rtol=0)


def test_an_engine_with_a_rank_process_ranks_in_parts_gives_the_one_call_scores_and_survives_its_death(
        packages, users, monkeypatch):
    """rank_processes=2: 200 candidates in 2 parts (at least MIN_PART each; 100 candidates in 1), the second scored in
    a helper process; the scores (with side features, after a prefetch, and with an explicit history) are those of
    the one-process engine. A helper killed between ranks: the next rank still answers the same scores (its part
    scored in the engine's own process) and a new helper replaces it. A helper stopped (SIGSTOP): the rank answers
    after the part timeout, with the same scores, and the helper is killed."""
    import serving.engine as serving_engine
    from serving.engine import MIN_PART, _parts

    assert _parts(200, 3) == [slice(0, 66), slice(66, 133), slice(133, 200)]
    assert _parts(100, 3) == [slice(0, 100)] and _parts(MIN_PART * 2, 8) == [slice(0, MIN_PART), slice(MIN_PART, 2 * MIN_PART)]
    package, _ = packages
    one = load_engine(package, None, ENGINE_CONFIG, generation=1)
    two = load_engine(package, None, SimpleNamespace(**vars(ENGINE_CONFIG), rank_parts=2), generation=1)
    assert (one.rank_processes(), two.rank_processes()) == ({"processes": 1, "ready": 1}, {"processes": 2, "ready": 2})
    chosen, raw_ids, items = users
    raw_user, _ = chosen[0]
    candidates = _candidates(items, 200, 5)
    side = {"candidate_categories": raw_ids("category", torch.randint(1, 10, (200,), generator=torch.Generator().manual_seed(2))).tolist()}
    limits = Limits(1000, 10_000)
    for engine in (one, two):
        engine.prefetch(raw_user)
    sent = []
    helper = two.helpers.helpers[0]
    original = helper.send
    helper.send = lambda message: sent.append(len(message)) or original(message)
    requests = [rank_request({"user_id": raw_user, "candidates": candidates, **side}, limits),
                rank_request({**_explicit(one.predictor, raw_ids, raw_user), "candidates": candidates}, limits)]
    for request in requests:
        split, facts = two.rank(request)
        assert torch.allclose(split, one.rank(request)[0], atol=1e-6, rtol=0)
    assert len(sent) == 2 and facts["cache"] == "none"
    assert two.local_share is not None and 0.25 <= two.local_share <= 0.75  # learnt from the two ranks' timings
    two.local_share = 0.7
    assert two._split(400, 1) == [slice(0, 280), slice(280, 400)] and two._split(100, 1) == [slice(0, 100)]
    assert two._split(200, 1) == [slice(0, 136), slice(136, 200)]  # never below MIN_PART for a helper
    split, _ = two.rank(requests[0])  # unequal parts, the same scores
    assert torch.allclose(split, one.rank(requests[0])[0], atol=1e-6, rtol=0)
    helper.proc.kill()
    helper.proc.join(10)
    split, _ = two.rank(requests[0])  # the dead helper's part: scored here
    assert torch.allclose(split, one.rank(requests[0])[0], atol=1e-6, rtol=0)
    assert helper.state == "failed" and helper.reason
    deadline = time.time() + 120
    while two.rank_processes()["ready"] < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert two.rank_processes() == {"processes": 2, "ready": 2} and two.helpers.helpers[0] is not helper
    assert torch.allclose(two.rank(requests[0])[0], one.rank(requests[0])[0], atol=1e-6, rtol=0)
    stopped = two.helpers.helpers[0]  # a helper that stops reading: the rank answers after the part timeout
    os.kill(stopped.proc.pid, signal.SIGSTOP)
    monkeypatch.setattr(serving_engine, "PART_TIMEOUT", 1.0)
    start = time.perf_counter()
    split, _ = two.rank(requests[1])
    assert time.perf_counter() - start < 10 and stopped.state == "failed" and "no answer" in stopped.reason
    assert torch.allclose(split, one.rank(requests[1])[0], atol=1e-6, rtol=0)
    deadline = time.time() + 15
    while _alive(stopped.proc.pid) and time.time() < deadline:  # killed at once, reaped in the background
        time.sleep(0.1)
    assert not _alive(stopped.proc.pid)
    replacement = two.helpers.helpers[0].proc
    del two, engine
    import gc

    gc.collect()  # the engine freed: its helpers exit
    deadline = time.time() + 15  # (not join(): the engine's background reaper waits on the same child; a
    while _alive(replacement.pid) and time.time() < deadline:  # second waiter can miss the status it takes)
        time.sleep(0.1)
    assert not _alive(replacement.pid)


def test_rank_processes_serve_one_rank_at_a_time_and_parts_carry_the_content_fields_a_package_has(tmp_path):
    """acquire: the helpers for one rank, None to a second rank meanwhile (it scores alone), again after release.
    A part message carries the content's own dataclass fields (a package's HistoryContent may predate ``ids``) and
    score_part rebuilds the package's class from them."""
    from serving.rank_processes import RankProcesses, decode, part_message, score_part

    helpers = RankProcesses(0, str(tmp_path / "unused.pt"))
    first = helpers.acquire()
    assert first == [] and helpers.acquire() is None
    helpers.release(first)
    again = helpers.acquire()
    assert again == []
    helpers.release(again)
    helpers.close()

    @dataclasses.dataclass(frozen=True)
    class OldContent:  # before ``ids``
        slots: torch.Tensor
        rows: torch.Tensor
        sq_norm: torch.Tensor

    content = OldContent(torch.tensor([1, 0, 2]), torch.randint(-5, 5, (3, 4), dtype=torch.int8), torch.rand(3))
    seen = {}

    class Predictor:
        def rank_indices(self, user, profile, candidates, items, cats, content=None, **side):
            seen.update(content=content, side=side)
            return torch.zeros(candidates.shape[0])

    tensors = decode(part_message(torch.tensor([3]), torch.zeros(5, dtype=torch.int64), torch.arange(4),
                                  torch.arange(3), torch.arange(3), {"candidate_cats": torch.ones(4, dtype=torch.int64),
                                                                     "candidate_cities": None}, content))
    assert score_part(Predictor(), OldContent, tensors).shape == (4,)
    rebuilt = seen["content"]
    assert isinstance(rebuilt, OldContent) and all(torch.equal(getattr(rebuilt, f), getattr(content, f))
                                                   for f in ("slots", "rows", "sq_norm"))
    assert torch.equal(seen["side"]["candidate_cats"], torch.ones(4, dtype=torch.int64))
    assert seen["side"]["candidate_cities"] is None


def test_rank_process_messages_round_trip_every_dtype_and_shape():
    from serving.rank_processes import decode, encode

    tensors = {"int8": torch.randint(-128, 127, (5, 3), dtype=torch.int8), "empty": torch.zeros(0, 4),
               "strided": torch.arange(20, dtype=torch.int64).view(4, 5)[:, ::2], "half": torch.randn(7).half(),
               "scalar": torch.tensor(3.5), "flags": torch.tensor([True, False, True]), "none": None}
    out = decode(encode(tensors))
    assert set(out) == set(tensors) - {"none"}
    for name, tensor in out.items():
        assert tensor.dtype == tensors[name].dtype and torch.equal(tensor, tensors[name]), name
    out["int8"][0, 0] = 1  # writable


def test_rank_indices_with_content_and_side_features_equals_score(packages, users):
    predictor = load_predictor(packages[0])
    chosen, raw_ids, items = users
    raw_user, index = chosen[1]
    user, profile, hist_items, hist_cats = predictor.user_history(raw_user)
    content = predictor.history_content(hist_items)
    distinct = torch.unique(hist_items[hist_items != 0])
    assert content.slots.shape == hist_items.shape and content.rows.shape[0] == distinct.numel() + 1
    assert torch.equal(content.rows[content.slots], predictor.stage.mm_table.table[hist_items])
    candidates = _candidates(items, 50, 3)
    cand = predictor.indices("item", candidates)
    side = {"candidate_categories": raw_ids("category", torch.randint(1, 10, (50,), generator=torch.Generator().manual_seed(1))),
            "candidate_cities": torch.zeros(50, dtype=torch.int64),
            "candidate_provinces": torch.full((50,), 55555, dtype=torch.int64)}
    given = {"candidate_cats": predictor.indices("category", side["candidate_categories"]),
             "candidate_cities": predictor.indices("item_city", side["candidate_cities"]),
             "candidate_provinces": predictor.indices("item_province", side["candidate_provinces"])}
    plain = _reference(predictor, raw_ids, index, raw_user, candidates)
    with_side = _reference(predictor, raw_ids, index, raw_user, candidates, side)
    for local in (None, content):
        got = predictor.rank_indices(user, profile, cand, hist_items, hist_cats, content=local)
        assert torch.allclose(got, plain, atol=1e-6, rtol=0)
        got = predictor.rank_indices(user, profile, cand, hist_items, hist_cats, content=local, **given)
        assert torch.allclose(got, with_side, atol=1e-6, rtol=0)
    assert not torch.allclose(plain, with_side, atol=1e-6, rtol=0)
    assert predictor.rank_indices(user, profile, cand[:0], hist_items, hist_cats).shape == (0,)
    with pytest.raises(ValueError, match="content"):  # the content of another history
        predictor.rank_indices(user, profile, cand, hist_items[1:], hist_cats[1:], content=content)
    with pytest.raises(ValueError, match="candidate_cats"):
        predictor.rank_indices(user, profile, cand, hist_items, hist_cats, candidate_cats=given["candidate_cats"][:3])
    with pytest.raises(ValueError, match="profile: 4 ids"):
        predictor.rank_indices(user, profile[:4], cand, hist_items, hist_cats)


class _OlderPredictor:
    """What a package exported before ``rank_indices`` offers the engine: its public rank, rank_user, user_history."""

    def __init__(self, predictor) -> None:
        self.config, self.histories, self._predictor = predictor.config, predictor.histories, predictor

    def rank(self, *args):
        return self._predictor.rank(*args)

    def rank_user(self, *args):
        return self._predictor.rank_user(*args)

    def user_history(self, user_id):
        return self._predictor.user_history(user_id)


def test_a_package_older_than_rank_indices_is_served_through_its_public_rank(packages, users):
    package, _ = packages
    current = load_engine(package, None, ENGINE_CONFIG, generation=1)
    assert not current.info.legacy
    engine = Engine(_OlderPredictor(current.predictor), dataclasses.replace(current.info, legacy=True),
                    PrefetchCache(1 << 26, 100), 1)
    assert not engine.local_gsu and engine.has_store
    predictor = load_predictor(package)
    chosen, raw_ids, items = users
    limits = Limits(1000, 10_000)
    raw_user, index = chosen[0]
    candidates = _candidates(items, 30, 5)
    expected = _reference(predictor, raw_ids, index, raw_user, candidates)
    cold, facts = engine.rank(rank_request({"user_id": raw_user, "candidates": candidates}, limits))
    assert facts["cache"] == "miss" and facts["history_length"] > 0
    rows, cached = engine.prefetch(raw_user)
    assert not cached and rows.local is None
    warm, facts = engine.rank(rank_request({"user_id": raw_user, "candidates": candidates}, limits))
    assert facts["cache"] == "hit"
    explicit, _ = engine.rank(rank_request({**_explicit(predictor, raw_ids, raw_user), "candidates": candidates}, limits))
    for got in (cold, warm, explicit):
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(BadRequest) as caught:
        engine.rank(rank_request({"user_id": raw_user, "candidates": candidates[:2], "candidate_cities": [1, 2]}, limits))
    assert caught.value.status == 422 and caught.value.message.startswith("candidate_cities: ")


def _bench_args(*flags) -> argparse.Namespace:
    import bench.serve as serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args([str(f) for f in flags])


def test_bench_serve_writes_its_own_package_of_the_asked_table_and_history(tmp_path):
    import bench.serve as serve

    workdir, out = tmp_path / "own", tmp_path / "inproc.json"
    args = _bench_args("--items", 3000, "--users", 3, "--history", 400, "--candidates", 30, "--requests", 50,
                       "--warmup", 1, "--workdir", workdir, "--json", out)
    assert serve.run(args) == 0
    result = json.loads(out.read_text())
    assert result["mm_table_rows"] == 3001 and result["history"] == 400 and result["users"] == 3
    assert result["requests"] == 50 and 0 < result["p50_ms"] <= result["p99_ms"]
    distinct = result["own_package"]["history_distinct_items"]
    assert len(distinct) == 3 and all(1 < d < 400 for d in distinct)  # popular items repeat
    # the package serves: by user id, with and without a prefetch, equal to score
    package = str(workdir / "model.pt")
    engine, predictor = load_engine(package, None, ENGINE_CONFIG, generation=1), load_predictor(package)
    assert engine.info.mm_table_mapped and engine.info.histories
    store = predictor.histories
    raw_user = int(predictor.vocabs["user"].keys[0])
    user_index = int(predictor.indices("user", [raw_user])[0])
    assert store.offsets[user_index, 1] - store.offsets[user_index, 0] == 400
    inverse = {space: dict(zip(predictor.vocabs[space].index.tolist(), predictor.vocabs[space].keys.tolist()))
               for space in ("item", "category", "profile_1", "profile_2", "profile_3", "profile_4", "profile_5")}
    raw_ids = lambda space, idx: torch.tensor([inverse[space].get(int(i), 0) for i in idx.reshape(-1)])  # noqa: E731
    candidates = _candidates(predictor.vocabs["item"].keys, 25, 2)
    expected = _reference(predictor, raw_ids, user_index, raw_user, candidates)
    cold, _ = engine.rank(rank_request({"user_id": raw_user, "candidates": candidates}, Limits(100, 1000)))
    engine.prefetch(raw_user)
    warm, facts = engine.rank(rank_request({"user_id": raw_user, "candidates": candidates}, Limits(100, 1000)))
    assert facts == {"history_length": 400, "cache": "hit"}
    for got in (cold, warm):
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="--items"):
        serve.run(_bench_args("--items", 10, "--workdir", tmp_path / "tiny"))


@pytest.mark.slow
def test_bench_serve_starts_a_server_on_its_own_package_and_ranks_after_prefetch(tmp_path):
    import bench.serve as serve

    out = tmp_path / "served.json"
    args = _bench_args("--serve", "--prefetch", "--items", 3000, "--users", 2, "--history", 300, "--candidates", 40,
                       "--seconds", 2, "--rank-processes", 1, "--workdir", tmp_path / "own", "--json", out)
    assert serve.run(args) == 0
    result = json.loads(out.read_text())
    assert result["requests"] > 0 and result["errors"] == 0 and result["prefetch"] is True
    assert result["history_mean"] == 300 and result["mm_table_rows"] == 3001 and not result["legacy_package"]
    assert result["rank_processes"] == {"processes": 1, "ready": 1}


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, "body"), (b"[1, 2]", 400, "body"),
    (b'{"user_id": 3, "candidates": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "body"),  # nested too deeply
    (b'{"candidates": [1], "user_id": 3, "colour": 1}', 422, "colour"),
    (b'{"user_id": 3}', 422, "candidates"),
    (b'{"candidates": [1, 2.5], "user_id": 3}', 422, "candidates[1]"),
    (b'{"candidates": [1, true], "user_id": 3}', 422, "candidates[1]"),
    (b'{"candidates": ["7"], "user_id": 3}', 422, "candidates[0]"),
    (b'{"candidates": [1], "user_id": 99999999999999999999}', 422, "user_id"),
    (b'{"candidates": [1, 2, 3, 4, 5]}', 422, "user_id"),
    (b'{"candidates": [1, 2, 3, 4, 5, 6], "user_id": 3}', 422, "--max-candidates"),
    (b'{"candidates": [1], "history_items": [1, 2]}', 422, "history_categories"),
    (b'{"candidates": [1], "history_items": [1, 2], "history_categories": [1]}', 422, "history_categories"),
    (b'{"candidates": [1, 2], "user_id": 3, "candidate_cities": [1]}', 422, "candidate_cities"),
    (b'{"candidates": [1], "history_items": [1], "history_categories": [1], "profile": {"age": 1}}', 422, "age"),
])
def test_bad_rank_bodies_are_refused_with_one_message(body, status, field):
    with pytest.raises(BadRequest) as caught:
        rank_request(parse_object(body), Limits(5, 10))
    assert caught.value.status == status and field in caught.value.message and "\n" not in caught.value.message


def test_prefetch_cache_is_a_bounded_lru():
    entry = lambda n: SimpleNamespace(nbytes=n)  # noqa: E731
    changes = []
    cache = PrefetchCache(max_bytes=100, max_users=3, on_change=lambda *a: changes.append(a))
    loads = []
    for key in (1, 2, 3):
        cache.prefetch(key, lambda key=key: loads.append(key) or entry(30))
    assert cache.lookup(1) is not None  # 1 is now the most recent
    assert cache.prefetch(1, lambda: pytest.fail("cached: no second load"))[1] is True
    cache.prefetch(4, lambda: entry(30))  # 120 bytes > 100: the least recently used (2) goes
    assert cache.lookup(2) is None and cache.lookup(1) is not None and cache.bytes == 90
    cache.prefetch(5, lambda: entry(500))  # larger than the cache: returned, not kept
    assert cache.lookup(5) is None and len(cache) == 3 and changes[-1] == (3, 90, 1)  # the eviction of 2
    with pytest.raises(RuntimeError):
        cache.prefetch(6, lambda: (_ for _ in ()).throw(RuntimeError("store read failed")))
    assert cache.lookup(6) is None and loads == [1, 2, 3]


def test_metrics_render_sums_workers_in_prometheus_text():
    shared = Metrics.shared(2)
    a, b = Metrics(shared, 2, 0), Metrics(shared, 2, 1)
    a.request("rank", 200, 0.004)
    b.request("rank", 200, 0.2)
    b.request("rank", 422, 0.001)
    a.error("invalid_request")
    b.count("cache_hits", 3)
    text = a.render()
    assert 'muse_requests_total{endpoint="rank",status="2xx"} 2' in text
    assert 'muse_requests_total{endpoint="rank",status="4xx"} 1' in text
    assert 'muse_request_duration_seconds_bucket{endpoint="rank",le="0.005"} 1' in text
    assert 'muse_request_duration_seconds_bucket{endpoint="rank",le="0.25"} 2' in text
    assert 'muse_request_duration_seconds_count{endpoint="rank"} 2' in text
    assert "muse_cache_hits_total 3" in text and 'muse_errors_total{kind="invalid_request"} 1' in text
    assert b.total(LAYOUT.counters["cache_hits"]) == 3
    for line in text.splitlines():
        assert line.startswith("# ") or len(line.rsplit(" ", 1)) == 2


# ---- a real server ----


class Client:
    """HTTP/1.1 keep-alive client of one server (one connection, reopened after the server closes it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def send(self, method: str, path: str, body=None, headers=None) -> tuple:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        data = response.read()
        if response.getheader("connection", "").lower() == "close":
            self.conn.close()
        kind = response.getheader("content-type", "")
        return response.status, (json.loads(data) if kind.startswith("application/json") else data.decode())


@pytest.fixture(scope="module")
def server(packages, tmp_path_factory):
    package, _ = packages
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # 2 rank processes per worker: a rank of at least 128 candidates is scored in two parts
    cmd = [os.path.join(VENV_BIN, "muse"), "serve", "--package", package, "--port", "0", "--workers", "2",
           "--rank-processes", "2", "--max-candidates", str(MAX_CANDIDATES), "--max-body-bytes", str(MAX_BODY),
           "--shutdown-timeout", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(tmp_path_factory.mktemp("cwd")))
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        pytest.fail(f"server did not start: {line}{proc.stderr.read()[-3000:]}")
    port = int(line.split("http://127.0.0.1:")[1].split()[0])
    yield SimpleNamespace(proc=proc, port=port, package=package)
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def _oversized(port: int) -> tuple:
    """(status, JSON) of a rank request announcing a body over the limit: the server answers from the headers
    and closes the connection, so the client sends the headers only and reads the answer, as with Expect."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _rank_body(candidates, **fields) -> dict:
    return {"candidates": candidates, **fields}


@pytest.mark.slow
def test_served_scores_equal_predictor_score(server, users):
    predictor = load_predictor(server.package)
    chosen, raw_ids, items = users
    client = Client(server.port)
    status, health = client.send("GET", "/health")
    assert status == 200 and health["package"]["histories"] and health["generation"] == 1
    assert health["rank_processes"] == {"processes": 2, "ready": 2}
    kernels = health["package"]["kernels"]  # each C kernel native or the torch fallback with its reason
    assert set(kernels) == {"gsu_filter", "gsu_dense_select", "pq_scan", "dice", "din", "esu"}
    assert all(v == "native" or v.startswith("torch fallback: ") for v in kernels.values())
    for seed, (raw_user, index) in enumerate(chosen[:3]):
        candidates = _candidates(items, 200, seed)
        expected = _reference(predictor, raw_ids, index, raw_user, candidates)
        status, cold = client.send("POST", "/rank", _rank_body(candidates, user_id=raw_user))
        assert status == 200 and cold["cache"] == "miss", cold
        status, fetched = client.send("POST", "/prefetch", {"user_id": raw_user})
        assert status == 200 and fetched["history_length"] == cold["history_length"] > 0
        status, warm = client.send("POST", "/rank", _rank_body(candidates, user_id=raw_user))  # same connection
        assert status == 200 and warm["cache"] == "hit", warm
        status, explicit = client.send("POST", "/rank", {**_explicit(predictor, raw_ids, raw_user),
                                                         "candidates": candidates})
        assert status == 200 and explicit["cache"] == "none"
        for got in (cold, warm, explicit):
            assert len(got["scores"]) == len(candidates)
            assert float((torch.tensor(got["scores"]) - expected).abs().max()) <= 1e-6
    status, unknown = client.send("POST", "/rank", _rank_body(candidates[:5], user_id=123456789))
    assert status == 200 and unknown["history_length"] == 0 and len(unknown["scores"]) == 5
    status, empty = client.send("POST", "/rank", _rank_body([], user_id=raw_user))
    assert status == 200 and empty["scores"] == []


@pytest.mark.slow
def test_every_error_class_is_one_4xx_message_and_the_server_stays_up(server):
    too_many = list(range(1, MAX_CANDIDATES + 2))
    cases = [
        ("POST", "/rank", b'{"candidates": [1,', 400),
        ("POST", "/rank", b'"just a string"', 400),
        ("POST", "/rank", _rank_body([1, 2], user_id=1, extra=1), 422),
        ("POST", "/rank", _rank_body(too_many, user_id=1), 422),
        ("POST", "/rank", _rank_body([1, "2"], user_id=1), 422),
        ("POST", "/rank", _rank_body([1, 2.0], user_id=1), 422),
        ("POST", "/rank", _rank_body([1], user_id=2 ** 64), 422),
        ("POST", "/prefetch", {"user_id": "abc"}, 422),
        ("POST", "/prefetch", {"user": 1}, 422),
        ("GET", "/rank", None, 405),
        ("GET", "/nowhere", None, 404),
        ("POST", "/admin/reload", {"package": "/tmp/elsewhere.pt"}, 422),
    ]
    client = Client(server.port)
    for method, path, body, status in cases:
        got, answer = client.send(method, path, body)
        assert got == status, (path, body if not isinstance(body, bytes) else body[:40], answer)
        assert isinstance(answer, dict) and list(answer) == ["error"] and answer["error"], answer
        assert "\n" not in answer["error"]
    status, answer = _oversized(server.port)
    assert status == 413 and list(answer) == ["error"] and "--max-body-bytes" in answer["error"], answer
    status, _ = client.send("GET", "/health")
    assert status == 200 and server.proc.poll() is None
    status, text = client.send("GET", "/metrics")
    assert status == 200
    values = _metrics(text)
    assert values['muse_errors_total{kind="malformed_json"}'] >= 2
    assert values['muse_errors_total{kind="invalid_request"}'] >= 6
    assert values['muse_errors_total{kind="too_large"}'] >= 1
    assert values['muse_errors_total{kind="not_found"}'] >= 1
    assert values["muse_cache_hits_total"] >= 3 and values["muse_cache_misses_total"] >= 3
    assert values['muse_request_duration_seconds_count{endpoint="rank"}'] >= 10


def _metrics(text: str) -> dict:
    """Prometheus text -> {series with labels: value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}


def _metric(text: str, series: str) -> float:
    return _metrics(text)[series]


def _hammer(port: int, body: dict, stop: threading.Event, results: list) -> None:
    client = Client(port)
    while not stop.is_set():
        try:
            results.append(client.send("POST", "/rank", body)[0])
        except OSError as err:
            results.append(repr(err))


def _await_generation(port: int, workers: int, generation: int, timeout: float = 60.0) -> None:
    """Until each of the ``workers`` workers (told apart by /health's worker index, over new connections, which the
    kernel spreads over them) reports ``generation``; a worker loads the new package in its own time."""
    seen: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client = Client(port)
        status, health = client.send("GET", "/health")
        client.conn.close()
        assert status == 200, health
        seen[health["worker"]] = health["generation"]
        if len(seen) == workers and all(g == generation for g in seen.values()):
            return
        time.sleep(0.05)
    raise AssertionError(f"workers {seen} not all at generation {generation} after {timeout:.0f} s")


@pytest.mark.slow
def test_reload_swaps_the_package_without_failing_requests_in_flight(server, packages, users):
    package, other = packages
    chosen, raw_ids, items = users
    raw_user, index = chosen[0]
    candidates = _candidates(items, 30, 11)
    body = _rank_body(candidates, user_id=raw_user)
    new = load_predictor(other, histories=f"{package}.histories")
    expected_new = _reference(new, raw_ids, index, raw_user, candidates)
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_hammer, args=(server.port, body, stop, results)) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    shutil.copyfile(other, package + ".tmp")
    os.replace(package + ".tmp", package)  # replaced atomically, as `muse export` writes it
    status, answer = Client(server.port).send("POST", "/admin/reload")
    assert status == 200 and answer["generation"] == 2, answer
    _await_generation(server.port, workers=2, generation=2)  # the other worker's watcher swaps in the background
    stop.set()
    for t in threads:
        t.join(60)
    assert results and set(results) == {200}, sorted(set(map(str, results)))
    for _ in range(4):  # any worker: every one serves generation 2 now
        client = Client(server.port)
        status, got = client.send("POST", "/rank", body)
        assert status == 200 and got["generation"] == 2
        assert float((torch.tensor(got["scores"]) - expected_new).abs().max()) <= 1e-6
    with open(package + ".tmp", "wb") as f:
        f.write(b"not a package")
    os.replace(package + ".tmp", package)
    status, answer = Client(server.port).send("POST", "/admin/reload")
    assert status == 422 and "still serving generation 2" in answer["error"], answer
    status, got = Client(server.port).send("POST", "/rank", body)
    assert status == 200 and got["generation"] == 2


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight_then_exits(server, users):
    chosen, raw_ids, items = users
    history = items[torch.arange(30_000) % items.numel()].tolist()
    long_history = {"history_items": history, "history_categories": [0] * len(history),
                    "candidates": _candidates(items, MAX_CANDIDATES, 5)}
    results, clients = [], [Client(server.port) for _ in range(4)]

    def one(client):
        try:
            results.append(client.send("POST", "/rank", long_history)[0])
        except OSError as err:
            results.append(repr(err))

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    probe = Client(server.port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until all four are being processed (the probe is the fifth)
        text = probe.send("GET", "/metrics")[1]
        if _metric(text, "muse_in_flight_requests") >= 5 or len(results) == 4:
            break
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert results == [200] * 4, results
    assert server.proc.wait(60) == 0
    with pytest.raises(OSError):
        Client(server.port).send("GET", "/health")


def test_an_approximate_gsu_package_ranks_and_serves_as_it_scores(prepared_dataset, users, tmp_path):
    """A muse_pq package (PQ codes carried in the package): rank_indices with and without the prefetched content,
    and the engine (which decodes every blob itself) give ``score``'s probabilities; the engine attaches the
    package's codes instead of rebuilding them."""
    from model.gsu import PQSettings
    from quantize.codes import write_codes

    data = str(tmp_path / "ds")
    shutil.copytree(prepared_dataset, data)
    write_codes(data, PQSettings(m=16, sample_rows=1500, iterations=4, seed=0), threads=1)
    package = str(tmp_path / "pq.pt")
    config = dataclasses.replace(ModelConfig.preset("muse_pq"), pq_candidates=60)  # K' < L: the PQ path runs
    export_package(make_run(tmp_path / "run", data, config), package, histories="test")
    predictor = load_predictor(package)
    chosen, raw_ids, items = users
    raw_user, index = chosen[0]
    user, profile, hist_items, hist_cats = predictor.user_history(raw_user)
    assert int((hist_items != 0).sum()) > config.pq_candidates
    candidates = _candidates(items, 30, 5)
    expected = _reference(predictor, raw_ids, index, raw_user, candidates)
    cand = predictor.indices("item", candidates)
    for local in (None, predictor.history_content(hist_items)):
        got = predictor.rank_indices(user, profile, cand, hist_items, hist_cats, content=local)
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    engine = load_engine(package, None, ENGINE_CONFIG, generation=1)
    assert torch.equal(engine.predictor.stage.pq.codes, predictor.stage.pq.codes)
    engine.prefetch(raw_user)
    served, _ = engine.rank(rank_request({"user_id": raw_user, "candidates": candidates}, Limits(1000, 10_000)))
    assert torch.allclose(served, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("flag, value, message", [("rank_processes", 0, "--rank-processes: must lie in [1, 64]"),
                                                  ("rank_processes", 100_000, "--rank-processes: must lie in [1, 64]"),
                                                  ("workers", 0, "--workers: must be >= 1")])
def test_serve_flags_out_of_range_are_one_user_error(packages, flag, value, message):
    from common.errors import UserError
    from serving.config import ServeConfig

    with pytest.raises(UserError, match=re.escape(message)):
        ServeConfig(package=packages[0], **{flag: value})


@pytest.mark.slow
def test_workers_do_not_outlive_a_killed_supervisor(packages, tmp_path):
    """SIGKILL to `muse serve` (no chance to stop its workers): the workers get SIGTERM from the kernel and exit,
    and their rank processes exit with them. (The second package: the reload tests rewrite the first.)"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.Popen([os.path.join(VENV_BIN, "muse"), "serve", "--package", packages[1], "--port", "0",
                             "--workers", "2", "--rank-processes", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))

    def spawned(parent: int) -> list:
        children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
        return [int(pid) for pid in children
                if "spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")]

    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line + proc.stderr.read()[-2000:]
        workers = spawned(proc.pid)
        helpers = [pid for worker in workers for pid in spawned(worker)]
        assert len(workers) == 2 and len(helpers) == 2
        proc.kill()
        proc.wait(30)
        deadline = time.time() + 30
        while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in workers + helpers):
            time.sleep(0.2)
        assert not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in workers + helpers)
    finally:
        if proc.poll() is None:
            proc.kill()



def test_rank_response_writes_each_float32_score_so_it_reads_back_as_itself():
    """scores_response: 9 significant digits a score (float32 reads back exactly), the other fields as json writes
    them, no scores at all; a NaN score is refused as JSONResponse refuses it (the route's 500)."""
    from serving.app import scores_response

    scores = torch.cat([torch.rand(500, generator=torch.Generator().manual_seed(4)),
                        torch.tensor([0.0, 1e-30, 1.0 - 2 ** -24, 1.0])])
    body = json.loads(scores_response(scores, {"cache": "hit", "package_id": "é", "generation": 3}).body)
    assert torch.equal(torch.tensor(body["scores"], dtype=torch.float32), scores)
    assert {k: v for k, v in body.items() if k != "scores"} == {"cache": "hit", "package_id": "é", "generation": 3}
    assert json.loads(scores_response(torch.zeros(0), {}).body) == {"scores": []}
    with pytest.raises(ValueError):
        scores_response(torch.tensor([float("nan")]), {})
