"""``muse serve``: the exported package as an HTTP ranking service (see ``serving`` and docs/serving.md).

The package runs code when loaded: serve only packages from trusted parties. Bind to loopback (the default)
or put the service behind a proxy that authenticates its clients: ``/admin/reload`` is not authenticated.
"""

import argparse

from serving.config import ServeConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServeConfig.__dataclass_fields__
    parser.add_argument("--package", required=True, metavar="PATH", help="package written by `muse export`")
    parser.add_argument("--histories", metavar="DIR", default=None,
                        help="history store to serve users by id from (default: PACKAGE.histories when it exists)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--rank-processes", type=int, default=None,
                        help="processes per worker: a rank's candidates are scored in up to this many parts at once, "
                        "one in the worker and one in each of its helper processes, torch at one thread in each "
                        "(default: cpus / workers, at most 64)")
    for flag, kind, text in (("max-candidates", int, "candidates per rank request"),
                             ("max-history", int, "behaviors of an explicit history"),
                             ("max-body-bytes", int, "bytes of a request body"),
                             ("cache-mb", float, "MiB of prefetched users per worker"),
                             ("cache-users", int, "prefetched users per worker"),
                             ("shutdown-timeout", float, "seconds requests in flight get to finish at SIGTERM")):
        default = defaults[flag.replace("-", "_")].default
        parser.add_argument(f"--{flag}", type=kind, default=default, help=f"most {text} (default {default})"
                            if not flag.startswith("shutdown") else f"{text} (default {default})")


def run(args: argparse.Namespace) -> int:
    from serving.workers import serve

    config = ServeConfig(package=args.package, histories=args.histories, host=args.host, port=args.port,
                         workers=args.workers, rank_processes=args.rank_processes, max_candidates=args.max_candidates,
                         max_history=args.max_history, max_body_bytes=args.max_body_bytes, cache_mb=args.cache_mb,
                         cache_users=args.cache_users, shutdown_timeout=args.shutdown_timeout)
    return serve(config)
