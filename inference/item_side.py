"""Item attributes for serving: the category, city and province index of every item index.

``muse prepare`` joins them into each sample (``target_cat``, ``item_city``, ``item_province`` of the
target item) but keeps no per-item table, so they are collected here from the target columns of every
shard of a prepared dataset. Items never seen as a target keep 0 (unknown) for all three; ``rank`` then
scores them with unknown attributes.
"""

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from common.errors import DataError
from common.io import path_manager
from datapipes.prepared import PreparedDataset

COLUMNS = ("target_item", "target_cat", "item_city", "item_province")


@dataclass(frozen=True)
class ItemAttributes:
    """int64 [V_item + 1] each, indexed by item index; 0 = unknown."""

    category: np.ndarray
    city: np.ndarray
    province: np.ndarray
    items_seen: int


def collect_item_attributes(dataset: PreparedDataset) -> ItemAttributes:
    """Scan the target columns of every split's shards (only those four columns are read)."""
    n = dataset.metadata.vocab_sizes["item"] + 1
    category, city, province = (np.zeros(n, np.int64) for _ in range(3))
    seen = np.zeros(n, bool)
    for split in dataset.metadata.splits:
        for path in dataset.shards(split):
            try:
                with path_manager.open(path, "rb") as f:
                    table = pq.read_table(f, columns=list(COLUMNS))
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: {', '.join(COLUMNS)}: not readable ({err})") from None
            item = table.column("target_item").to_numpy().astype(np.int64)
            if item.size and (item.min() < 0 or item.max() >= n):
                raise DataError(f"{path}: target_item: ids outside [0, {n})")
            category[item] = table.column("target_cat").to_numpy()
            city[item] = table.column("item_city").to_numpy()
            province[item] = table.column("item_province").to_numpy()
            seen[item] = True
    seen[0] = False
    category[0] = city[0] = province[0] = 0
    return ItemAttributes(category, city, province, int(seen.sum()))
