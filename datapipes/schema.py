"""The Taobao-MM raw release: six parquet files, their columns and arrow types.

All ids are hashed int64 (any value, negatives included); 0 means padding/missing.
"""

from dataclasses import dataclass
from typing import Dict, Tuple

import pyarrow as pa

TRAIN_SAMPLES = "train_samples.parquet"
TEST_SAMPLES = "test_samples.parquet"
TRAIN_USER_FEATURES = "train_user_features.parquet"
TEST_USER_FEATURES = "test_user_features.parquet"
ITEM_FEATURES = "item_features.parquet"
SCL_EMBEDDINGS = "scl_embedding_int8_p90.parquet"
RAW_FILES = (TRAIN_SAMPLES, TEST_SAMPLES, TRAIN_USER_FEATURES, TEST_USER_FEATURES, ITEM_FEATURES, SCL_EMBEDDINGS)

# Column names of the release.
LABEL = "label_0"
USER = "129_1"
ITEM = "205"
PROFILE_COLUMNS = ("130_1", "130_2", "130_3", "130_4", "130_5")
HIST_ITEMS = "150_2_180"
HIST_CATS = "151_2_180"
CATEGORY = "206"
CITY = "213"
PROVINCE = "214"
EMBEDDING = "205_c"

MM_DIM = 128
RECENT_LEN = 50
LABEL_WIDTH = 2


@dataclass(frozen=True)
class ColumnType:
    """An expected column: ``base`` is int8/int64; ``is_list`` marks list<base>; ``length`` a fixed list length."""

    base: pa.DataType
    is_list: bool = False
    length: int = 0

    def describe(self) -> str:
        if not self.is_list:
            return str(self.base)
        return f"list<{self.base}>" + (f" of length {self.length}" if self.length else "")

    def arrow_type(self) -> pa.DataType:
        return pa.list_(self.base) if self.is_list else self.base


INT64 = ColumnType(pa.int64())
SCHEMAS: Dict[str, Dict[str, ColumnType]] = {
    TRAIN_SAMPLES: {LABEL: ColumnType(pa.int8(), True, LABEL_WIDTH), USER: INT64, ITEM: INT64},
    TEST_SAMPLES: {LABEL: ColumnType(pa.int8(), True, LABEL_WIDTH), USER: INT64, ITEM: INT64},
    TRAIN_USER_FEATURES: {USER: INT64, **{c: INT64 for c in PROFILE_COLUMNS},
                          HIST_ITEMS: ColumnType(pa.int64(), True), HIST_CATS: ColumnType(pa.int64(), True)},
    TEST_USER_FEATURES: {USER: INT64, **{c: INT64 for c in PROFILE_COLUMNS},
                         HIST_ITEMS: ColumnType(pa.int64(), True), HIST_CATS: ColumnType(pa.int64(), True)},
    ITEM_FEATURES: {ITEM: INT64, CATEGORY: INT64, CITY: INT64, PROVINCE: INT64},
    SCL_EMBEDDINGS: {ITEM: INT64, EMBEDDING: ColumnType(pa.int8(), True, MM_DIM)},
}


def arrow_schema(filename: str) -> pa.Schema:
    """The exact arrow schema of one raw file."""
    return pa.schema([(name, col.arrow_type()) for name, col in SCHEMAS[filename].items()])


# Prepared id spaces (embedding tables); the vocabulary of each maps hashed id -> [1, V].
ID_SPACES = ("user", "item", "category") + tuple(f"profile_{i}" for i in range(1, 6)) + ("item_city", "item_province")
SPLITS: Tuple[str, str] = ("train", "test")
SPLIT_FILES = {"train": (TRAIN_SAMPLES, TRAIN_USER_FEATURES), "test": (TEST_SAMPLES, TEST_USER_FEATURES)}
