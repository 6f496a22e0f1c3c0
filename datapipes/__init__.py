"""Raw Taobao-MM parquet -> prepared shards -> per-rank streaming batches (and synthetic raw data)."""
