"""``muse bench serve``: latency of the exported package ranking many candidates for one user with a long history.

Each request is one ``predictor.rank(user, history_items, history_cats, candidates)`` call on the package
loaded with ``inference.load_predictor``: raw hashed ids in (vocabulary lookups included), one score per
candidate out. Reported: p50 / p99 / mean / max latency per request over ``--requests`` timed requests
(after ``--warmup`` untimed ones), and candidates scored per second.

Requests: the users of the test split of ``--data`` (default: the package's own dataset), each with exactly
``--history`` behaviors: the newest ones of the user's history, and where the history is shorter, the
user's own history repeated (older copies in front) up to that length, so that every request does the
same work; ``--candidates`` items are drawn at random from the package's item vocabulary per request.

Without ``--package`` or ``--run`` the benchmark builds its own small run in ``--workdir`` (a temp
directory by default): it synthesizes a Taobao-MM-schema dataset whose users have ``--history``
behaviors (40 users, 50,000 items), prepares it, trains MUSE for 4 steps on one rank (``muse train``),
and exports it (``muse export``); this takes about a minute and is not timed. Its multimodal table is
small (50,000 x 128 int8) and stays in the CPU caches, so the gathers are cheaper than with the
Taobao-MM table (35.4M x 128); pass ``--package`` / ``--data`` of a real export to measure that.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

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

MIN_REQUESTS = 50
OWN_USERS, OWN_ITEMS, OWN_SAMPLES = 40, 50_000, 400

Request = Tuple[Dict[str, int], torch.Tensor, torch.Tensor]


MAX_CLIENTS, MAX_SECONDS = 64, 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="load a running `muse serve` (e.g. http://127.0.0.1:8000) instead "
                        "of the package in process: --clients concurrent keep-alive clients for --seconds")
    parser.add_argument("--clients", type=int, default=1, help=f"with --url: concurrent clients, at most {MAX_CLIENTS} (default 1)")
    parser.add_argument("--seconds", type=float, default=10.0, help=f"with --url: duration, at most {MAX_SECONDS} (default 10)")
    parser.add_argument("--prefetch", action="store_true", help="with --url: rank users by id, each rank preceded by "
                        "POST /prefetch on the same connection (default: explicit histories in the body)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--package", metavar="PATH", help="package written by `muse export`")
    source.add_argument("--run", metavar="RUN_DIR", help="training run to export first (into --workdir)")
    parser.add_argument("--data", metavar="DIR", help="prepared dataset whose test users make the requests "
                        "(default: the dataset the package was exported from)")
    parser.add_argument("--candidates", type=int, default=1000, help="candidates per request (default 1000)")
    parser.add_argument("--history", type=int, default=100_000, help="behaviors per request history (default 100,000)")
    parser.add_argument("--requests", type=int, default=MIN_REQUESTS, help=f"timed requests, at least {MIN_REQUESTS} (default {MIN_REQUESTS})")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the candidate draws (default 0)")
    parser.add_argument("--workdir", default=None, help="where an own run is built (default: a temp directory, removed)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


def _build_own_run(workdir: str, history: int) -> str:
    """Synthesize, prepare, train (4 steps, 1 rank) and export a small MUSE run; returns the package path."""
    from datapipes.prepare import PrepareConfig, prepare
    from datapipes.synth import SynthConfig, synthesize

    raw, data, run = (os.path.join(workdir, name) for name in ("raw", "prepared", "run"))
    print(f"building an own run in {workdir}: synth, prepare, train 4 steps, export ...", flush=True)
    synthesize(SynthConfig(users=OWN_USERS, items=OWN_ITEMS, samples=OWN_SAMPLES, seq_len=history, seed=0), raw, force=True)
    prepare(PrepareConfig(raw=raw, out=data, force=True))
    muse = os.path.join(os.path.dirname(sys.executable), "muse")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [muse, "train", "--data", data, "--model", "muse", "--run", run, "--steps", "4", "--batch-size", "16",
           "--eval-batch-size", "16", "--nproc-per-node", "1", "--runs-dir", workdir]
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training the benchmark's own run failed:\n{done.stderr[-3000:]}")
    package = os.path.join(workdir, "model.pt")
    export_package(run, package)
    return package


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


def _percentile(values: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(package: str, data_dir: Optional[str], candidates: int, history: int, requests: int, warmup: int,
            seed: int) -> Dict[str, object]:
    """Load the package, time ``warmup + requests`` rank calls; the latency statistics in ms."""
    load_start = time.perf_counter()
    predictor = load_predictor(package)
    load_seconds = time.perf_counter() - load_start
    data_dir = data_dir or predictor.manifest["dataset"]["path"]
    pool = _requests(predictor, data_dir, history)
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
        "package": os.path.abspath(package), "data": os.path.abspath(data_dir), "model": predictor.config.name,
        "candidates": candidates, "history": history, "users": len(pool), "requests": requests, "warmup": warmup,
        "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99), "mean_ms": mean_ms,
        "min_ms": float(min(latencies)), "max_ms": float(max(latencies)),
        "candidates_per_s": candidates / (mean_ms / 1000), "package_load_s": load_seconds,
        "mm_table_rows": int(predictor.stage.mm_table.num_rows), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }


def _load_url(args: argparse.Namespace) -> Dict[str, object]:
    """Drive ``--url`` with ``--clients`` threads for ``--seconds``; rank latency statistics (ms), QPS, errors."""
    import http.client
    import threading
    from urllib.parse import urlparse

    url = urlparse(args.url)
    if url.scheme != "http" or not url.hostname:
        raise UserError(f"--url {args.url}: expected http://HOST:PORT")
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS:
        raise UserError(f"--clients / --seconds: at most {MAX_CLIENTS} clients and {MAX_SECONDS} s")
    port = url.port or 80
    try:
        conn = http.client.HTTPConnection(url.hostname, port, timeout=30)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
    except (OSError, ValueError) as err:
        raise UserError(f"--url {args.url}: no muse server answering /health ({err})") from None
    data_dir = args.data or health["package"]["dataset"]
    dataset = PreparedDataset.open(data_dir)
    ids = RawIds(dataset)
    store = dataset.histories("test")
    lengths = store.offsets[:, 1] - store.offsets[:, 0]
    users = [int(u) for u in np.argsort(-lengths)[:32] if lengths[u] > 0]
    if not users:
        raise UserError(f"--data {data_dir}: the test split's store has no user with a history")
    item_keys = ids("item", torch.arange(1, dataset.metadata.vocab_sizes["item"] + 1))
    bodies = []
    gen = torch.Generator().manual_seed(args.seed)
    for u in users:
        cands = item_keys[torch.randint(0, item_keys.numel(), (args.candidates,), generator=gen)].tolist()
        raw_user = int(ids("user", torch.tensor([u]))[0])
        if args.prefetch:
            bodies.append((raw_user, json.dumps({"user_id": raw_user, "candidates": cands}).encode()))
        else:
            items, cats = (torch.from_numpy(a.astype(np.int64)) for a in store.history(u))
            items, cats = _repeat_to(items, args.history), _repeat_to(cats, args.history)
            bodies.append((raw_user, json.dumps({"user_id": raw_user, "history_items": ids("item", items).tolist(),
                                                 "history_categories": ids("category", cats).tolist(),
                                                 "candidates": cands}).encode()))
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
        raise UserError(f"--url {args.url}: no request succeeded ({errors[0]} errors)")
    return {"url": args.url, "clients": args.clients, "seconds": wall, "prefetch": args.prefetch,
            "candidates": args.candidates, "history_mean": float(np.mean(history_lengths)),
            "requests": len(latencies), "errors": errors[0], "qps": len(latencies) / wall,
            "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99),
            "mean_ms": float(np.mean(latencies)), "max_ms": float(max(latencies)),
            "mm_table_rows": health["package"]["mm_table_rows"], "load": os.getloadavg()}


def run(args: argparse.Namespace) -> int:
    if args.url:
        result = _load_url(args)
        print(tabulate([[result["clients"], "yes" if result["prefetch"] else "no", result["candidates"],
                         f"{result['history_mean']:,.0f}", result["requests"], f"{result['qps']:.1f}",
                         f"{result['p50_ms']:.1f}", f"{result['p99_ms']:.1f}", result["errors"]]],
                       headers=["clients", "prefetch", "candidates", "history", "requests", "QPS", "p50 ms", "p99 ms",
                                "errors"]))
        if args.json:
            write_text_atomic(args.json, json.dumps(result, indent=2), flag="--json")
        return 0
    if args.json:
        check_output_path(args.json, "--json")
    for flag in ("candidates", "history"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag}: must be >= 1 (got {getattr(args, flag)})")
    if args.requests < MIN_REQUESTS:
        raise UserError(f"--requests: at least {MIN_REQUESTS} for a meaningful p99 (got {args.requests})")
    if args.warmup < 0:
        raise UserError(f"--warmup: must be >= 0 (got {args.warmup})")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads: must be >= 1 (got {args.threads})")
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
            package = _build_own_run(workdir, args.history)
        result = measure(package, args.data, args.candidates, args.history, args.requests, args.warmup, args.seed)
    result["command"] = "muse bench serve " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "serve"] else [])
    print(tabulate([[result["model"], result["candidates"], f"{result['history']:,}", result["requests"],
                     f"{result['p50_ms']:.1f}", f"{result['p99_ms']:.1f}", f"{result['mean_ms']:.1f}",
                     f"{result['candidates_per_s']:,.0f}", result["threads"]]],
                   headers=["model", "candidates", "history", "requests", "p50 ms", "p99 ms", "mean ms", "candidates/s", "threads"]))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2), flag="--json")
    return 0
