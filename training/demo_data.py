"""The dataset ``muse train`` uses when none is given: synthetic Taobao-MM-schema data, prepared once
and cached (a second ``muse train`` reuses it)."""

import hashlib
import json
import os
from dataclasses import asdict

from common.io import path_manager
from datapipes.prepare import SCHEMA_VERSION, PrepareConfig, prepare
from datapipes.synth import SynthConfig, synthesize

# Small enough for a few minutes of 2-rank CPU training, long-tailed and with a lifelong signal.
DEMO_SYNTH = SynthConfig(users=2000, items=10000, samples=40000, seq_len=1000, seed=0)
DEMO_SHARD_ROWS = 4000


def demo_dataset(cache_dir: str) -> str:
    """Path of the prepared demo dataset under ``cache_dir``, synthesizing and preparing it if absent (the cache key
    includes the prepared layout's schema version, so a cache of an older layout is not reused)."""
    spec = json.dumps({"synth": asdict(DEMO_SYNTH), "shard_rows": DEMO_SHARD_ROWS, "schema_version": SCHEMA_VERSION},
                      sort_keys=True)
    root = os.path.join(cache_dir, "demo-" + hashlib.sha256(spec.encode()).hexdigest()[:12])
    prepared = os.path.join(root, "prepared")
    if path_manager.exists(os.path.join(prepared, "metadata.json")):
        return prepared
    raw = os.path.join(root, "raw")
    print(f"synthesizing a demo dataset in {raw} ...", flush=True)
    synthesize(DEMO_SYNTH, raw, force=True)
    print(f"preparing it in {prepared} ...", flush=True)
    prepare(PrepareConfig(raw=raw, out=prepared, shard_rows=DEMO_SHARD_ROWS, force=True))
    return prepared
