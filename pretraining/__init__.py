"""``muse pretrain``: the frozen 128-d multimodal table learned from raw content vectors.

``config`` (PretrainConfig), ``content`` (raw content vectors keyed by item id), ``pairs`` (I2I pairs mined
from the behavior histories, SCL pairs from a file; bounded bottom-k sample), ``moco`` (MLP projection,
InfoNCE, momentum encoder and its queue), ``train`` (the seeded, resumable training loop), ``checkpoint``,
``writer`` (the release's ``scl_embedding_int8_p90.parquet``), ``run`` (the whole command).
"""
