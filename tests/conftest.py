"""Shared fixtures: a small synthetic raw dataset and its prepared form (session-scoped, a few seconds)."""

import pytest

from datapipes.prepare import PrepareConfig, prepare
from datapipes.synth import SynthConfig, synthesize

# Small but structured: 8 clusters, histories up to 120 long (> the recent 50), several shards per split.
SMALL_SYNTH = SynthConfig(users=200, items=2000, samples=2400, seq_len=120, categories=16, clusters=8, seed=7)
SMALL_SHARD_ROWS = 300


@pytest.fixture(scope="session")
def raw_dataset(tmp_path_factory) -> str:
    """Directory with the six raw Taobao-MM files of SMALL_SYNTH. Do not modify it: copy first."""
    out = tmp_path_factory.mktemp("raw") / "taobao_mm"
    synthesize(SMALL_SYNTH, str(out))
    return str(out)


@pytest.fixture(scope="session")
def prepared_dataset(raw_dataset, tmp_path_factory) -> str:
    """Prepared dataset directory (metadata.json, mm_table.npy, vocab/, train/, test/) of raw_dataset."""
    out = tmp_path_factory.mktemp("prepared") / "dataset"
    prepare(PrepareConfig(raw=raw_dataset, out=str(out), shard_rows=SMALL_SHARD_ROWS, buckets=2))
    return str(out)
