"""General search unit, the public entry points: ``cosine_topk`` (exact cosine top-K of a target item against
a user's whole behavior history in the frozen multimodal table, ``model.gsu_topk``) and ``GsuStage`` (the
input-pipeline stage ``RawBatch -> Batch``, ``model.gsu_stage``), plus the pair cosines they share.

Modules: ``gsu_inputs`` (argument checks, work sizes, norms and shadow caches), ``gsu_shadow`` (the int8
filter shadow of bf16/float32 tables), ``gsu_filter`` (prefilter dot products and thresholds), ``gsu_ranking``
(running top-k keys), ``gsu_cosine`` (exact pair cosines), ``gsu_topk`` (the streaming top-k), ``gsu_stage``
(the pipeline stage).
"""

from model.gsu_cosine import history_cosines, pair_cosine
from model.gsu_inputs import DEFAULT_CHUNK_ROWS, chunk_rows_for, gather_rows_for
from model.gsu_stage import GsuStage
from model.gsu_topk import cosine_topk

__all__ = ["DEFAULT_CHUNK_ROWS", "GsuStage", "chunk_rows_for", "cosine_topk", "gather_rows_for", "history_cosines",
           "pair_cosine"]
