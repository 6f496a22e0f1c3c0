"""The HTTP routes of one worker (a Starlette app run by uvicorn).

    POST /rank          candidates (+ user_id or an explicit history, optional side features) -> one score each
    POST /prefetch      {"user_id": id}: the user's history and content rows into this worker's cache
    GET  /health        this worker: package, generation, store, cache
    GET  /metrics       the whole server's metrics, Prometheus text format
    POST /admin/reload  load the package file again in every worker (as SIGHUP to the supervisor does)

Every refusal is a 4xx with one JSON object ``{"error": "<field>: <what>"}``; an unexpected failure is a 500
with the same shape, and the worker keeps serving. Bodies larger than ``--max-body-bytes`` are refused (413)
from their Content-Length, or as soon as the streamed bytes pass the limit.
"""

import json
import os
import time
from dataclasses import asdict
from typing import Any, Awaitable, Callable, Dict

import anyio
import anyio.to_thread
import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.metrics import CONTENT_TYPE
from serving.schema import BadRequest, Limits, parse_object, prefetch_request, rank_request
from serving.state import WorkerState

Handler = Callable[[Request], Awaitable[Response]]
# Prefetches read the store and gather rows in threads of their own, beside the one model computation.
_PREFETCH_THREADS = 4


def scores_response(scores: torch.Tensor, fields: Dict[str, Any]) -> Response:
    """``{"scores": [...], **fields}`` as JSON, each float32 score written with 9 significant digits (what a float32
    needs to read back as itself): about twice as fast as ``json`` writing each as a double's 17 digits, for the
    1,000 scores of a rank. A NaN or infinite score goes through ``JSONResponse``, which refuses it, as before."""
    values = scores.to(torch.float32)
    if not bool(torch.isfinite(values).all()):
        return JSONResponse({"scores": values.tolist(), **fields})
    rest = json.dumps(fields, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    body = '{"scores":[' + ",".join(map("{:.9g}".format, values.tolist())) + "]" + ("," + rest[1:] if fields else "}")
    return Response(body.encode("utf-8"), media_type="application/json")


def _error(status: int, message: str, close: bool = False) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"connection": "close"} if close else None)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (``BadRequest`` 413 beyond, 400 for a bad Content-Length)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise BadRequest(400, f"Content-Length: {length!r} is not a byte count", "malformed_json")
        if int(length) > limit:
            raise BadRequest(413, f"body: {int(length):,} bytes, at most {limit:,} (--max-body-bytes)", "too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"body: more than {limit:,} bytes (--max-body-bytes)", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(state: WorkerState) -> Starlette:
    """The worker's ASGI app over ``state`` (its engine is read once per request)."""
    config, metrics = state.config, state.metrics
    limits = Limits(config.max_candidates, config.max_history)
    compute = anyio.CapacityLimiter(1)  # one rank at a time per worker (its parts use the rank processes)
    prefetching = anyio.CapacityLimiter(_PREFETCH_THREADS)

    def endpoint(name: str, handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            start = time.perf_counter()
            metrics.add_gauge("in_flight", 1)
            try:
                response = await handler(request)
            except BadRequest as err:
                metrics.error(err.kind)
                response = _error(err.status, err.message, close=err.status == 413)
            except Exception as err:  # noqa: BLE001 - the worker answers and stays up
                metrics.error("internal")
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                response = _error(500, f"internal error: {type(err).__name__}: {first}")
            finally:
                metrics.add_gauge("in_flight", -1)
            metrics.request(name, response.status_code, time.perf_counter() - start)
            return response

        return run

    async def rank(request: Request) -> Response:
        body = await read_body(request, config.max_body_bytes)
        req = await anyio.to_thread.run_sync(lambda: rank_request(parse_object(body), limits))
        engine = state.engine
        if not req.explicit_history and not engine.has_store:
            raise BadRequest(422, "user_id: this server has no history store (start it with --histories DIR, or "
                             "send history_items and history_categories)", "no_store")
        scores, facts = await anyio.to_thread.run_sync(engine.rank, req, limiter=compute)
        if facts["cache"] == "hit":
            metrics.count("cache_hits")
        elif facts["cache"] == "miss":
            metrics.count("cache_misses")
        return scores_response(scores, {**facts, "generation": engine.generation, "package_id": engine.info.package_id})

    async def prefetch(request: Request) -> Response:
        body = await read_body(request, config.max_body_bytes)
        req = prefetch_request(parse_object(body))
        engine = state.engine
        if not engine.has_store:
            raise BadRequest(422, "user_id: this server has no history store to prefetch from (--histories DIR)",
                             "no_store")
        rows, cached = await anyio.to_thread.run_sync(engine.prefetch, req.user_id, limiter=prefetching)
        if not cached:
            metrics.count("cache_misses")
        return JSONResponse({"user_id": req.user_id, "history_length": int(rows.items.shape[0]), "cached": cached,
                             "bytes": rows.nbytes, "worker": state.index, "generation": engine.generation})

    async def health(request: Request) -> Response:
        engine = state.engine
        return JSONResponse({"status": "ok", "worker": state.index, "pid": os.getpid(), "generation": engine.generation,
                             "package": asdict(engine.info), "cache_users": len(engine.cache),
                             "cache_bytes": engine.cache.bytes, "rank_processes": engine.rank_processes(),
                             "last_reload_error": state.last_error})

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def reload(request: Request) -> Response:
        body = await read_body(request, config.max_body_bytes)
        if body.strip() and parse_object(body):
            raise BadRequest(422, "body: /admin/reload takes no fields (it reloads --package from its path)",
                             "invalid_request")
        result = await anyio.to_thread.run_sync(state.request_reload, config.shutdown_timeout)
        if not result.ok:
            metrics.error("reload_failed")
            return _error(422, f"reload to generation {result.generation} failed, still serving generation "
                          f"{state.engine.generation}: {result.error}")
        return JSONResponse({"generation": result.generation, "package_id": state.engine.info.package_id})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        if kind:
            metrics.error(kind)
        metrics.request("other", exc.status_code, 0.0)
        text = {404: f"{request.url.path}: no such endpoint (POST /rank, POST /prefetch, GET /health, GET /metrics, "
                     "POST /admin/reload)",
                405: f"{request.url.path}: method {request.method} not allowed"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, text)

    routes = [Route("/rank", endpoint("rank", rank), methods=["POST"]),
              Route("/prefetch", endpoint("prefetch", prefetch), methods=["POST"]),
              Route("/health", endpoint("health", health), methods=["GET"]),
              Route("/metrics", endpoint("metrics", metrics_text), methods=["GET"]),
              Route("/admin/reload", endpoint("reload", reload), methods=["POST"])]
    handlers: Dict[Any, Any] = {HTTPException: http_error}
    return Starlette(routes=routes, exception_handlers=handlers)
