"""``muse serve``: the exported package as an online ranking service (HTTP JSON over uvicorn + Starlette).

Modules, one job each: ``config`` (the typed server settings), ``schema`` (request parsing and validation),
``cache`` (the bounded LRU of prefetched users), ``engine`` (ranking on a loaded package, the package's
multimodal table memory-mapped from the package file), ``metrics`` (Prometheus counters and histograms in
memory shared by the workers), ``app`` (the HTTP routes), ``workers`` (the supervisor: socket, worker
processes, signals, reload).
"""
