"""General search unit, the public entry points: ``cosine_topk`` (exact cosine top-K of a target item against
a user's whole behavior history in the frozen multimodal table, ``model.gsu.topk``) and ``GsuStage`` (the
input-pipeline stage ``RawBatch -> Batch``, ``model.gsu.stage``), plus the pair cosines they share.

Modules: ``inputs`` (argument checks, work sizes, norms and shadow caches), ``shadow`` (the int8 filter
shadow of bf16/float32 tables), ``filter`` (prefilter dot products and thresholds), ``ranking`` (running top-k
keys), ``cosine`` (exact pair cosines and rescoring), ``topk`` (the streaming top-k), ``stage`` (the pipeline
stage), ``kernels`` (which exact int8 product kernel runs, measured on the host once per process), ``pq`` (product
quantization of the table: codebooks, codes, ``PQIndex``) and ``pq_topk`` (the approximate GSU on those codes).
"""

from model.gsu.cosine import history_cosines, pair_cosine
from model.gsu.inputs import DEFAULT_CHUNK_ROWS, chunk_rows_for, gather_rows_for
from model.gsu.pq import PQIndex, PQSettings
from model.gsu.pq_topk import pq_topk
from model.gsu.stage import GsuStage
from model.gsu.topk import cosine_topk

__all__ = ["DEFAULT_CHUNK_ROWS", "GsuStage", "PQIndex", "PQSettings", "chunk_rows_for", "cosine_topk", "gather_rows_for",
           "history_cosines", "pair_cosine", "pq_topk"]
