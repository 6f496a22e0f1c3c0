"""``muse pq``: product-quantization codes of a prepared dataset's multimodal table, written beside it
(``quantize.codes``); the index and the search they serve live in ``model.gsu.pq`` / ``model.gsu.pq_topk``."""
