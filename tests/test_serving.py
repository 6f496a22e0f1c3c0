"""``muse serve``: the engine's scores equal ``Predictor.score`` (with and without a prefetch, with side features),
request validation, the prefetch cache and metrics in process; then a real server on a loopback port (2
workers): real requests, every error class a 4xx with one message while the server stays up, a reload under
load, and a graceful SIGTERM with requests in flight."""

import http.client
import json
import os
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

from datapipes.prepared import PreparedDataset
from inference import load_predictor
from inference.export import export_package
from inference.predict import RawIds
from model.config import ModelConfig
from serving.cache import PrefetchCache
from serving.engine import load_engine
from serving.metrics import LAYOUT, Metrics
from serving.schema import BadRequest, Limits, parse_object, rank_request
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


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, "body"), (b"[1, 2]", 400, "body"),
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
    cmd = [os.path.join(VENV_BIN, "muse"), "serve", "--package", package, "--port", "0", "--workers", "2",
           "--threads", "1", "--max-candidates", str(MAX_CANDIDATES), "--max-body-bytes", str(MAX_BODY),
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
    time.sleep(1.0)  # the other worker's watcher swaps within its poll interval
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
