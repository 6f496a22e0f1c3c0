"""Data scales for capacity planning: vocabulary sizes per id space.

A scale is either read from a prepared dataset's ``metadata.json`` or taken from a preset of the
Taobao-MM release. ``vocab_sizes[space]`` is the number of real ids; every embedding table has
``size + 1`` rows (row 0 = padding / unknown), exactly as in training.

Preset sizes (Taobao-MM, MUSE paper arXiv 2512.07216 and the release's statistics):
  items 35.4M (``taobao-mm-p90``: the items covering 90% of behaviors) or 243M (``taobao-mm-full``),
  users 8.79M, categories 26K.
The release does not state the cardinality of the five user-profile fields (raw columns 130_1..130_5)
or of the item city / province fields. The presets use documented upper bounds that are generous for
demographic buckets and Chinese administrative divisions (34 provincial-level, ~330 prefecture-level
divisions, rounded up): profile fields 1,000 / 100 / 100 / 20 / 20, item_city 1,000, item_province 100.
Together these tables hold under 0.001% of the bytes of the item table, so a wrong guess here cannot
change a fits / does-not-fit verdict.
"""

import json
from dataclasses import dataclass, field
from typing import Dict, Optional

from common.errors import DataError, UserError
from common.io import path_manager

ID_SPACES = (
    "user", "item", "category", "profile_1", "profile_2", "profile_3", "profile_4", "profile_5",
    "item_city", "item_province",
)

_RELEASE_COMMON = {
    "user": 8_790_000,
    "category": 26_000,
    "profile_1": 1_000,
    "profile_2": 100,
    "profile_3": 100,
    "profile_4": 20,
    "profile_5": 20,
    "item_city": 1_000,
    "item_province": 100,
}

PRESETS: Dict[str, Dict[str, int]] = {
    "taobao-mm-p90": {**_RELEASE_COMMON, "item": 35_400_000},
    "taobao-mm-full": {**_RELEASE_COMMON, "item": 243_000_000},
}


@dataclass(frozen=True)
class DataScale:
    """Vocabulary sizes (real ids per id space; tables have size + 1 rows) and where they came from."""

    source: str
    vocab_sizes: Dict[str, int] = field(default_factory=dict)
    mm_dim: int = 128
    samples: Optional[int] = None  # train samples (a prepared dataset's; presets: none, see capacity.layout)
    metadata: Optional[dict] = None  # a prepared dataset's metadata.json
    data_dir: Optional[str] = None

    def rows(self, space: str) -> int:
        """Rows of the embedding table of ``space`` (real ids + the padding row)."""
        return self.vocab_sizes[space] + 1


def preset(name: str) -> DataScale:
    """A Taobao-MM preset scale; ``UserError`` naming ``--preset`` for an unknown name."""
    if name not in PRESETS:
        raise UserError(f"--preset: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return DataScale(source=f"preset {name}", vocab_sizes=dict(PRESETS[name]))


def from_prepared(data_dir: str) -> DataScale:
    """The scale of a prepared dataset, from ``DATA_DIR/metadata.json`` (``vocab_sizes``, ``mm_dim``)."""
    path = f"{data_dir.rstrip('/')}/metadata.json"
    if not path_manager.isfile(path):
        raise UserError(f"--data: {path} does not exist (run `muse prepare` first)")
    try:
        with path_manager.open(path, "r") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err})") from err
    sizes = meta.get("vocab_sizes")
    if not isinstance(sizes, dict):
        raise DataError(f"{path}: vocab_sizes: missing")
    missing = [s for s in ID_SPACES if not isinstance(sizes.get(s), int) or sizes[s] < 0]
    if missing:
        raise DataError(f"{path}: vocab_sizes: missing or negative for {', '.join(missing)}")
    train = meta.get("splits", {}).get("train", {})
    return DataScale(source=path, vocab_sizes={s: int(sizes[s]) for s in ID_SPACES}, mm_dim=int(meta.get("mm_dim", 128)),
                     samples=int(train["rows"]) if "rows" in train else None, metadata=meta, data_dir=data_dir)
