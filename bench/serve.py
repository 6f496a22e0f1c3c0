"""``muse bench serve``: latency of ranking many candidates for one user with a long history, in process or over HTTP.

In process (default): each request is one ``predictor.rank(user, history_items, history_cats, candidates)`` call
on the package loaded with ``inference.load_predictor``: raw hashed ids in (vocabulary lookups included), one
score per candidate out. Over HTTP (``--url`` a running ``muse serve``, or ``--serve``: start one on the package on
a free loopback port and stop it after): ``--clients`` keep-alive clients for ``--seconds``, each rank either
with the history in the body or, with ``--prefetch``, by user id after ``POST /prefetch`` of that user on the same
connection (only the rank is timed). Reported: p50 / p99 / mean / max latency, QPS, errors, the ``uptime`` load.

Requests: users of the package's history store (``<package>.histories``), or of the test split of ``--data``,
each with exactly ``--history`` behaviors (the newest of the user's history, repeated end to end where it is
shorter); ``--candidates`` items are drawn at random from the package's item vocabulary per request.

Without ``--package`` or ``--run`` the benchmark writes its own package in ``--workdir`` (a temp directory by
default) in seconds: an untrained MUSE of ``--items`` items (a table of ``--items + 1`` rows, 1,000,000 by
default: 128 MB int8), with a store of ``--users`` users of ``--history`` behaviors each (``bench.serve_package``).
"""

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from tabulate import tabulate

from common.errors import UserError
from datapipes.prepared import PreparedDataset
from datapipes.histories import HistoryGather
from datapipes.reader import make_dataloader
from common.atomic import check_output_path, write_text_atomic
from inference.export import export_package
from inference.loader import load_predictor
from inference.predict import RawIds
from bench.serve_package import OwnPackageConfig, build_own_package
from serving.config import MAX_RANK_PROCESSES

MIN_REQUESTS = 50
POOL_USERS = 32

Request = Tuple[Dict[str, int], torch.Tensor, torch.Tensor]


MAX_CLIENTS, MAX_SECONDS = 64, 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="load a running `muse serve` (e.g. http://127.0.0.1:8000) instead "
                        "of the package in process: --clients concurrent keep-alive clients for --seconds")
    parser.add_argument("--clients", type=int, default=1, help=f"with --url / --serve: concurrent clients, at most {MAX_CLIENTS} (default 1)")
    parser.add_argument("--seconds", type=float, default=10.0, help=f"with --url / --serve: duration, at most {MAX_SECONDS} (default 10)")
    parser.add_argument("--prefetch", action="store_true", help="with --url / --serve: rank users by id, each rank "
                        "preceded by POST /prefetch on the same connection (default: explicit histories in the body)")
    parser.add_argument("--serve", action="store_true", help="start `muse serve` on the package (a free loopback port, "
                        "--workers workers, --rank-processes processes each), drive it as --url does, stop it")
    parser.add_argument("--workers", type=int, default=1, help="with --serve: worker processes (default 1)")
    parser.add_argument("--items", type=int, default=1_000_000, help="own package: items, the multimodal table has "
                        "ITEMS + 1 rows (default 1,000,000)")
    parser.add_argument("--users", type=int, default=8, help="own package: users in its history store (default 8)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--package", metavar="PATH", help="package written by `muse export`")
    source.add_argument("--run", metavar="RUN_DIR", help="training run to export first (into --workdir)")
    parser.add_argument("--data", metavar="DIR", help="prepared dataset whose test users make the requests "
                        "(default: the dataset the package was exported from)")
    parser.add_argument("--candidates", type=int, default=1000, help="candidates per request (default 1000)")
    parser.add_argument("--history", type=int, default=100_000, help="behaviors per request history (default 100,000)")
    parser.add_argument("--requests", type=int, default=MIN_REQUESTS, help=f"timed requests, at least {MIN_REQUESTS} (default {MIN_REQUESTS})")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="in process (no --url / --serve): torch intra-op "
                        "threads (default: torch's)")
    parser.add_argument("--rank-processes", type=int, default=None, help="with --serve: the server's --rank-processes, "
                        "processes a worker scores one rank in (default: cpus / workers)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the candidate draws (default 0)")
    parser.add_argument("--workdir", default=None, help="where an own run is built (default: a temp directory, removed)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def _repeat_to(values: torch.Tensor, length: int) -> torch.Tensor:
    """The newest ``length`` entries of ``values`` [n] repeated end to end (newest last), [length]."""
    copies = -(-length // values.numel())
    return values.repeat(copies)[-length:]


def _requests(predictor, data_dir: str, history: int) -> List[Request]:
    """(user features, history items, history categories) of every test user, raw ids, ``history`` long."""
    dataset = PreparedDataset.open(data_dir)
    ids = RawIds(dataset)
    loader = make_dataloader(data_dir, "test", 0, 1, 1, transform=HistoryGather(dataset.histories("test")), num_workers=0,
                             shuffle=False,
                             drop_last=False, drop_remainder=False)
    seen, out = set(), []
    for raw in loader:
        user = int(raw.user_id[0])
        if user in seen:
            continue
        seen.add(user)
        real = raw.history_items[0] != 0
        if not bool(real.any()):
            continue
        items, cats = _repeat_to(raw.history_items[0][real], history), _repeat_to(raw.history_cats[0][real], history)
        features = {"user_id": int(ids("user", raw.user_id)[0])}
        features.update({f"profile_{i + 1}": int(ids(f"profile_{i + 1}", raw.profile[:, i])[0]) for i in range(5)})
        out.append((features, ids("item", items), ids("category", cats)))
    if not out:
        raise UserError(f"--data {data_dir}: the test split has no rows with a history to make requests from")
    return out


def _raw_of(predictor, space: str) -> torch.Tensor:
    """int64 [V + 1]: the raw id of every vocabulary index of ``space`` (0 for index 0)."""
    vocab = predictor.vocabs[space]
    inverse = torch.zeros(vocab.index.numel() + 1, dtype=torch.int64)
    inverse[vocab.index] = vocab.keys
    return inverse


def _store_requests(predictor, history: int) -> List[Request]:
    """``_requests`` from the package's attached history store: its ``POOL_USERS`` users with the longest histories."""
    store = predictor.histories
    lengths = store.offsets[:, 1] - store.offsets[:, 0]
    users = [int(u) for u in np.argsort(-lengths, kind="stable")[:POOL_USERS] if lengths[u] > 0]
    if not users:
        raise UserError(f"--package: its history store {store.root} has no user with a history")
    raw = {space: _raw_of(predictor, space) for space in ("user", "item", "category") + tuple(f"profile_{i}" for i in range(1, 6))}
    out = []
    for u in users:
        items, cats = (torch.from_numpy(a.astype(np.int64)) for a in store.history(u))
        features = {"user_id": int(raw["user"][u])}
        features.update({f"profile_{i + 1}": int(raw[f"profile_{i + 1}"][int(store.profile[u, i])]) for i in range(5)})
        out.append((features, raw["item"][_repeat_to(items, history)], raw["category"][_repeat_to(cats, history)]))
    return out


def _request_pool(predictor, data_dir: Optional[str], history: int) -> Tuple[List[Request], str]:
    """(requests, where they came from): ``--data``'s test split when given, else the package's store, else the
    test split of the dataset it was exported from."""
    if data_dir is None and predictor.histories is not None:
        return _store_requests(predictor, history), os.path.abspath(predictor.histories.root)
    data_dir = data_dir or predictor.manifest["dataset"]["path"]
    return _requests(predictor, data_dir, history), os.path.abspath(data_dir)


def _percentile(values: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(package: str, data_dir: Optional[str], candidates: int, history: int, requests: int, warmup: int,
            seed: int) -> Dict[str, object]:
    """Load the package, time ``warmup + requests`` rank calls; the latency statistics in ms."""
    load_start = time.perf_counter()
    predictor = load_predictor(package)
    load_seconds = time.perf_counter() - load_start
    pool, source = _request_pool(predictor, data_dir, history)
    item_keys = predictor.vocabs["item"].keys
    gen = torch.Generator().manual_seed(seed)
    latencies: List[float] = []
    for i in range(warmup + requests):
        user, items, cats = pool[i % len(pool)]
        cands = item_keys[torch.randint(0, item_keys.numel(), (candidates,), generator=gen)]
        start = time.perf_counter()
        scores = predictor.rank(user, items, cats, cands)
        elapsed = time.perf_counter() - start
        if scores.shape != (candidates,):
            raise RuntimeError(f"rank returned shape {tuple(scores.shape)} for {candidates} candidates")
        if i >= warmup:
            latencies.append(elapsed * 1000)
    mean_ms = float(np.mean(latencies))
    return {
        "package": os.path.abspath(package), "data": source, "model": predictor.config.name,
        "candidates": candidates, "history": history, "users": len(pool), "requests": requests, "warmup": warmup,
        "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99), "mean_ms": mean_ms,
        "min_ms": float(min(latencies)), "max_ms": float(max(latencies)),
        "candidates_per_s": candidates / (mean_ms / 1000), "package_load_s": load_seconds,
        "mm_table_rows": int(predictor.stage.mm_table.num_rows), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cpus", "load": os.getloadavg(),
    }


def _bodies(args: argparse.Namespace, health: Dict[str, object]) -> List[Tuple[int, bytes]]:
    """(raw user id, rank body) per pool user: the package the server reports, read here (same host), gives the
    users of its store (or of ``--data``) and the candidate ids."""
    package = health["package"]
    predictor = load_predictor(package["path"], histories=package["histories"])
    pool, _ = _request_pool(predictor, args.data, args.history)
    item_keys = predictor.vocabs["item"].keys
    gen = torch.Generator().manual_seed(args.seed)
    bodies = []
    for features, items, cats in pool:
        cands = item_keys[torch.randint(0, item_keys.numel(), (args.candidates,), generator=gen)].tolist()
        body = {"user_id": features["user_id"], "candidates": cands}
        if not args.prefetch:
            body.update({"history_items": items.tolist(), "history_categories": cats.tolist(),
                         "profile": {k: v for k, v in features.items() if k != "user_id"}})
        bodies.append((features["user_id"], json.dumps(body).encode()))
    return bodies


def _load_url(args: argparse.Namespace, address: str) -> Dict[str, object]:
    """Drive the server at ``address`` with ``--clients`` threads for ``--seconds`` (after ``--warmup`` untimed
    requests); rank latency statistics (ms), QPS, errors."""
    import http.client
    import threading
    from urllib.parse import urlparse

    url = urlparse(address)
    if url.scheme != "http" or not url.hostname:
        raise UserError(f"--url {address}: expected http://HOST:PORT")
    port = url.port or 80
    try:
        conn = http.client.HTTPConnection(url.hostname, port, timeout=30)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
    except (OSError, ValueError) as err:
        raise UserError(f"--url {address}: no muse server answering /health ({err})") from None
    bodies = _bodies(args, health)
    for raw_user, body in bodies[:args.warmup] * (1 + args.warmup // max(1, len(bodies))):
        if args.prefetch:
            conn.request("POST", "/prefetch", body=json.dumps({"user_id": raw_user}).encode())
            conn.getresponse().read()
        conn.request("POST", "/rank", body=body)
        conn.getresponse().read()
    conn.close()
    load_start = os.getloadavg()
    latencies: List[float] = []
    history_lengths: List[int] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + args.seconds

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection(url.hostname, port, timeout=60)
        i = offset
        while time.perf_counter() < deadline:
            raw_user, body = bodies[i % len(bodies)]
            i += 1
            try:
                if args.prefetch:
                    conn.request("POST", "/prefetch", body=json.dumps({"user_id": raw_user}).encode())
                    conn.getresponse().read()
                start = time.perf_counter()
                conn.request("POST", "/rank", body=body)
                response = conn.getresponse()
                answer = response.read()
                elapsed = (time.perf_counter() - start) * 1000
                ok = response.status == 200
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection(url.hostname, port, timeout=60)
                ok = False
            with lock:
                if ok:
                    latencies.append(elapsed)
                    history_lengths.append(json.loads(answer)["history_length"])
                else:
                    errors[0] += 1

    begin = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    if not latencies:
        raise UserError(f"--url {address}: no request succeeded ({errors[0]} errors)")
    return {"url": address, "clients": args.clients, "seconds": wall, "prefetch": args.prefetch,
            "candidates": args.candidates, "history_mean": float(np.mean(history_lengths)),
            "requests": len(latencies), "errors": errors[0], "qps": len(latencies) / wall,
            "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99),
            "mean_ms": float(np.mean(latencies)), "max_ms": float(max(latencies)),
            "mm_table_rows": health["package"]["mm_table_rows"], "package": health["package"]["path"],
            "legacy_package": health["package"].get("legacy", False), "load_start": load_start,
            "rank_processes": health.get("rank_processes"),
            "load": os.getloadavg()}


@contextlib.contextmanager
def _server(package: str, args: argparse.Namespace) -> Iterator[str]:
    """``muse serve`` on ``package`` on a free loopback port for the duration; yields its address."""
    muse = os.path.join(os.path.dirname(sys.executable), "muse")
    cmd = [muse, "serve", "--package", package, "--port", "0", "--workers", str(args.workers),
           "--max-candidates", str(max(10_000, args.candidates)), "--max-history", str(max(200_000, args.history))]
    if args.rank_processes is not None:
        cmd += ["--rank-processes", str(args.rank_processes)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if "listening on http://" not in line:
            raise RuntimeError(f"muse serve did not start (exit code {proc.wait(60)}): {line.strip()}")
        yield line.split("listening on ", 1)[1].split()[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _check(args: argparse.Namespace) -> None:
    """UserError naming the first bad flag."""
    for flag in ("candidates", "history", "items", "users", "workers"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag}: must be >= 1 (got {getattr(args, flag)})")
    if args.requests < MIN_REQUESTS:
        raise UserError(f"--requests: at least {MIN_REQUESTS} for a meaningful p99 (got {args.requests})")
    if args.warmup < 0:
        raise UserError(f"--warmup: must be >= 0 (got {args.warmup})")
    for flag in ("threads", "rank_processes"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: must be >= 1 (got {getattr(args, flag)})")
    if args.rank_processes is not None and args.rank_processes > MAX_RANK_PROCESSES:
        raise UserError(f"--rank-processes: must lie in [1, {MAX_RANK_PROCESSES}] (got {args.rank_processes})")
    if args.rank_processes is not None and not args.serve:
        raise UserError("--rank-processes: a setting of the server --serve starts (with --url, start the server with it)")
    if args.threads is not None and (args.serve or args.url):
        raise UserError("--threads: torch threads of the in-process run (for --serve, see --rank-processes)")
    if not 1 <= args.clients <= MAX_CLIENTS:
        raise UserError(f"--clients: must lie in [1, {MAX_CLIENTS}] (got {args.clients})")
    if not 0 < args.seconds <= MAX_SECONDS:
        raise UserError(f"--seconds: must lie in (0, {MAX_SECONDS}] (got {args.seconds})")
    if args.url and (args.serve or args.package or args.run):
        raise UserError(f"--url {args.url}: drives a running server; drop --serve / --package / --run")


def _print(result: Dict[str, object]) -> None:
    if "qps" in result:
        print(tabulate([[result["clients"], "yes" if result["prefetch"] else "no", result["candidates"],
                         f"{result['history_mean']:,.0f}", f"{result['mm_table_rows']:,}", result["requests"],
                         f"{result['qps']:.1f}", f"{result['p50_ms']:.1f}", f"{result['p99_ms']:.1f}", result["errors"]]],
                       headers=["clients", "prefetch", "candidates", "history", "table rows", "requests", "QPS",
                                "p50 ms", "p99 ms", "errors"]))
        return
    print(tabulate([[result["model"], result["candidates"], f"{result['history']:,}", f"{result['mm_table_rows']:,}",
                     result["requests"], f"{result['p50_ms']:.1f}", f"{result['p99_ms']:.1f}", f"{result['mean_ms']:.1f}",
                     f"{result['candidates_per_s']:,.0f}", result["threads"]]],
                   headers=["model", "candidates", "history", "table rows", "requests", "p50 ms", "p99 ms", "mean ms",
                            "candidates/s", "threads"]))


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.json:
        check_output_path(args.json, "--json")
    own = None
    if args.url:
        result = _load_url(args, args.url)
    else:
        if args.threads is not None and not args.serve:
            torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix="muse-bench-serve-") as scratch:
            workdir = args.workdir or scratch
            os.makedirs(workdir, exist_ok=True)
            if args.package:
                package = args.package
            elif args.run:
                package = os.path.join(workdir, "model.pt")
                export_package(args.run, package)
            else:
                print(f"writing the benchmark's own package in {workdir}: {args.items:,} items, {args.users} users x "
                      f"{args.history:,} behaviors ...", flush=True)
                own = build_own_package(workdir, OwnPackageConfig(items=args.items, users=args.users,
                                                                  history=args.history, seed=args.seed))
                package = own.path
            if args.serve:
                with _server(package, args) as address:
                    result = _load_url(args, address)
            else:
                result = measure(package, args.data, args.candidates, args.history, args.requests, args.warmup,
                                 args.seed)
    if own is not None:
        result["own_package"] = {"items": args.items, "users": args.users, "history": args.history,
                                 "history_distinct_items": own.distinct, "build_s": own.seconds}
    result["command"] = "muse bench serve " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "serve"] else [])
    _print(result)
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2), flag="--json")
    return 0
