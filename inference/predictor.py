"""The packaged predictor: raw hashed ids in, click probabilities out. This module is the package's entry.

It ships inside the torch.package (interned with ``model.*``, ``datapipes.batch`` and
``inference.manifest``) and imports nothing but the standard library, torch, torchrec, fbgemm_gpu, numpy and
those interned modules, so a process with torch, torchrec and numpy installed runs it::

    import torch
    importer = torch.package.PackageImporter("model.pt")
    predictor = importer.import_module("inference.predictor").load(importer)   # verifies every checksum
    predictor.rank({"user_id": 123}, history_items, history_cats, candidate_items)

Ids: every argument holds raw hashed ids of the release; each is mapped through the vocabulary of its id
space (unknown ids and 0 -> index 0, the padding/unknown row). Histories are oldest first, newest last.
"""

from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from datapipes.batch import PROFILE_FIELDS, RawBatch
from datapipes.histories import HistoryStore
from inference.manifest import (BLOB_PACKAGE, MANIFEST_NAME, MANIFEST_PACKAGE, PackageIntegrityError, decode_blob,
                                parse_manifest)
from model.config import ModelConfig
from model.gsu import GsuStage, PQIndex, cosine_topk, pair_cosine, pq_topk
from model.gsu.cosine import cross_cosines
from model.gsu.stage import Selected
from model.gsu.table import MMTable, RowNorms
from model.muse import MuseModel, build_model

IdsLike = Union[torch.Tensor, Sequence[int], Any]
USER_FEATURES = ("user_id",) + PROFILE_FIELDS
ID_SPACES = ("user", "item", "category") + PROFILE_FIELDS + ("item_city", "item_province")
# Blobs never written after loading: their tensors share the package's bytes instead of copying them.
FROZEN_BLOBS = ("mm_table",)
# rank(): candidates x history positions per step for the in-model GSU variants (they read the whole history).
_IN_MODEL_CHUNK = 1 << 21


class VocabTable:
    """Raw hashed id -> vocabulary index. keys: int64 [V] sorted raw ids; index: int64 [V] their indices.

    A lookup runs in numpy on views of the same memory (numpy's per-call cost is below torch's, which is most of
    the time of the one-id lookups a rank makes: its user and profile). Large vocabularies also get a
    bucket index: the keys' range cut into 2**16 equal buckets (offsets from the smallest key, in uint64), each
    bucket's first key position, and each id searched within its bucket only (``_BUCKET_STEPS`` halvings at most,
    vectorised) instead of across all V keys, whose lower levels miss the CPU caches once a rank has run between
    two lookups (``muse bench kernels``' vocabulary row). Hashed ids spread evenly over the buckets (~15 keys each at 1M); when the keys are too uneven for the
    step budget the table keeps the plain binary search. Both give the same indices."""

    _BUCKET_BITS = 16
    _BUCKET_STEPS = 8  # halvings within a bucket: buckets of up to 255 keys

    def __init__(self, keys: torch.Tensor, index: torch.Tensor, buckets: Optional[bool] = None) -> None:
        """buckets: build the bucket index (True), keep the binary search (False), or by size (None: from
        524,288 keys, where the binary search's lower levels leave the caches)."""
        self.keys, self.index = keys, index
        self._keys = keys.detach().cpu().contiguous().numpy()
        self._index = index.detach().cpu().contiguous().numpy()
        wanted = self._keys.shape[0] >= (8 << self._BUCKET_BITS) if buckets is None else buckets
        self._buckets = self._bucket_index() if wanted and self._keys.shape[0] else None

    def _bucket_index(self) -> Optional[tuple]:
        """(smallest key as uint64, shift, each bucket's first key position int64 [2**BITS + 1], halvings) or None
        (negative keys, or keys too uneven for ``_BUCKET_STEPS``)."""
        if self._keys[0] < 0:  # negative keys: their unsigned order differs from the signed one
            return None
        keys = self._keys.view(np.uint64)
        low = keys[0]
        span = int(keys[-1] - low)
        shift = max(0, span.bit_length() - self._BUCKET_BITS)
        edges = low + (np.arange(1 << self._BUCKET_BITS, dtype=np.uint64) << np.uint64(shift))
        starts = np.append(np.searchsorted(keys, edges), keys.shape[0]).astype(np.int64)
        widest = int(np.diff(starts).max())
        if widest >= 1 << self._BUCKET_STEPS:
            return None
        return low, np.uint64(shift), starts, max(1, widest.bit_length())

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """For ids int64 [n]: the position of each id in the keys when present (any position otherwise)."""
        if self._buckets is None:
            return np.searchsorted(self._keys, ids)
        low, shift, starts, steps = self._buckets
        bucket = np.minimum((ids.view(np.uint64) - low) >> shift, np.uint64(starts.shape[0] - 2)).astype(np.int64)
        pos, end = starts[bucket], starts[bucket + 1]
        last = self._keys.shape[0] - 1
        step = 1 << (steps - 1)
        while step:  # pos: the first key >= id within [start, end), found by halving
            ahead = pos + step
            pos = np.where((ahead <= end) & (self._keys[np.minimum(ahead - 1, last)] < ids), ahead, pos)
            step >>= 1
        return pos

    def lookup(self, raw: torch.Tensor) -> torch.Tensor:
        """int64 indices, same shape as ``raw``; 0 for unknown ids and for 0."""
        raw = raw.detach().to("cpu", torch.int64).contiguous()
        if self._keys.shape[0] == 0:
            return torch.zeros_like(raw)
        ids = raw.numpy().reshape(-1)
        pos = self._positions(ids)
        np.minimum(pos, self._keys.shape[0] - 1, out=pos)
        hit = (self._keys[pos] == ids) & (ids != 0)
        return torch.from_numpy(np.where(hit, self._index[pos], 0)).view(raw.shape)


@dataclass
class ItemSide:
    """Per item index: its category, city and province indices (int64 [V_item + 1] each; 0 = unknown)."""

    category: torch.Tensor
    city: torch.Tensor
    province: torch.Tensor


@dataclass(frozen=True)
class HistoryContent:
    """The multimodal content rows of one history (``Predictor.history_content``), gathered once, e.g. at a
    prefetch, so that ranking this history reads only the candidates' rows of the big table.

    slots: int64 [L] each history position's row in ``rows`` (0 = no content row: padding or an unknown item).
    rows: [U + 1, D] the table's dtype; row 0 zeros, rows 1..U the U distinct items, oldest newest-occurrence first.
    sq_norm: [U + 1] their squared norms (the table's ``RowNorms.sq_norm``).
    ids: int64 [U + 1] the table row of each of ``rows`` (0 for row 0), for the PQ codes of an approximate GSU.
    """

    slots: torch.Tensor
    rows: torch.Tensor
    sq_norm: torch.Tensor
    ids: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.slots, self.rows, self.sq_norm, self.ids))


class Predictor:
    """Scores (user, item) pairs with the exported model.

    score(...):  one probability per row, each row with its own user and history.
    rank(...):   one user and one history (up to 100,000 behaviors) against many candidate items: the GSU
                 scores the history against all candidates in one pass (the history is gathered once),
                 then the ESU and tower run on the candidates as one batch.
    rank_user(...): ``rank`` for a user id whose profile and history come from an attached history store
                 (``attach_histories``: a prepared split's store, or the copy exported beside the package).
    rank_indices(...): ``rank`` in vocabulary indices (``indices``), with optional candidate attributes and the
                 history's prefetched content rows (``history_content``): what a ranking server calls.
    score_indices(raw): a ``RawBatch`` already in vocabulary indices (a prepared dataset's rows).
    """

    def __init__(self, config: ModelConfig, model: MuseModel, mm_table: MMTable, vocabs: Mapping[str, VocabTable],
                 items: ItemSide, manifest: Mapping[str, Any]) -> None:
        self.config = config
        self.model = model.eval()
        self.stage = GsuStage(config, mm_table)
        self.vocabs = dict(vocabs)
        self.items = items
        self.manifest = dict(manifest)
        self.max_seq_len: Optional[int] = self.manifest.get("train_config", {}).get("max_seq_len")
        self.histories: Optional[HistoryStore] = None

    # ---- raw ids -> indices ----

    def _map(self, space: str, raw: IdsLike) -> torch.Tensor:
        return self.vocabs[space].lookup(torch.as_tensor(raw, dtype=torch.int64))

    def _item_attributes(self, items: torch.Tensor, category: Optional[IdsLike], city: Optional[IdsLike],
                         province: Optional[IdsLike]) -> tuple:
        """Category, city, province indices of item indices: from the caller's raw ids when given, else
        from the dataset's item attributes (``item_features``, packaged at export)."""
        cat = self._map("category", category) if category is not None else self.items.category[items]
        cit = self._map("item_city", city) if city is not None else self.items.city[items]
        prov = self._map("item_province", province) if province is not None else self.items.province[items]
        return cat, cit, prov

    # ---- scoring ----

    @torch.no_grad()
    def score_indices(self, raw: RawBatch) -> torch.Tensor:
        """float32 [B] click probabilities of a ``RawBatch`` in vocabulary indices."""
        return torch.sigmoid(self.model(self.stage(raw)))

    @torch.no_grad()
    def score(self, user_id: IdsLike, profile: IdsLike, target_item: IdsLike, history_items: IdsLike,
              history_cats: IdsLike, target_cat: Optional[IdsLike] = None, item_city: Optional[IdsLike] = None,
              item_province: Optional[IdsLike] = None) -> torch.Tensor:
        """float32 [B] click probabilities of B (user, target item) rows, all in raw hashed ids.

        user_id [B]; profile [B, 5] (profile_1..profile_5); target_item [B]; history_items / history_cats
        [B, L] left-padded with 0, newest at L-1. target_cat, item_city, item_province [B]: the target's
        attributes (default: the dataset's item attributes).
        """
        user = self._map("user", user_id).reshape(-1)
        b = user.shape[0]
        prof = torch.as_tensor(profile, dtype=torch.int64).reshape(b, len(PROFILE_FIELDS))
        prof = torch.stack([self._map(f, prof[:, i]) for i, f in enumerate(PROFILE_FIELDS)], dim=1)
        target = self._map("item", target_item).reshape(b)
        hist_items = self._map("item", history_items).reshape(b, -1)
        hist_cats = self._map("category", history_cats).reshape(b, -1)
        if hist_items.shape != hist_cats.shape:
            raise ValueError(f"history_cats: shape {tuple(hist_cats.shape)} differs from history_items {tuple(hist_items.shape)}")
        cat, city, prov = self._item_attributes(target, target_cat, item_city, item_province)
        raw = RawBatch(labels=torch.zeros(b), user_id=user, profile=prof, target_item=target, target_cat=cat.reshape(b),
                       item_city=city.reshape(b), item_province=prov.reshape(b), history_items=hist_items, history_cats=hist_cats)
        return self.score_indices(raw)

    @torch.no_grad()
    def rank(self, user_features: Mapping[str, int], history_item_ids: IdsLike, history_category_ids: IdsLike,
             candidate_item_ids: IdsLike) -> torch.Tensor:
        """float32 [C] click probability of each candidate for one user.

        user_features: {"user_id": raw id, "profile_1".."profile_5": raw ids}; missing keys are unknown (0).
        history_item_ids, history_category_ids: [L] raw ids, oldest first (L up to 100,000 and beyond).
        candidate_item_ids: [C] raw ids; their category/city/province come from the training data.
        Equal to ``score`` of the C rows (same user, same history, each candidate as the target).
        """
        unknown = sorted(set(user_features) - set(USER_FEATURES))
        if unknown:
            raise ValueError(f"user_features: unknown key(s) {', '.join(unknown)} (expected {', '.join(USER_FEATURES)})")
        cand = self.indices("item", candidate_item_ids).reshape(-1)
        if cand.shape[0] == 0:
            return torch.zeros(0)
        items = self.indices("item", history_item_ids).reshape(-1)
        cats = self.indices("category", history_category_ids).reshape(-1)
        if items.shape != cats.shape:
            raise ValueError(f"history_category_ids: length {cats.shape[0]} differs from history_item_ids {items.shape[0]}")
        user = self.indices("user", [user_features.get("user_id", 0)])
        prof = torch.cat([self.indices(f, [user_features.get(f, 0)]) for f in PROFILE_FIELDS])
        return self.rank_indices(user, prof, cand, items, cats)

    def attach_histories(self, store: Union[str, HistoryStore]) -> None:
        """Serve users by id (``rank_user``) from a history store: a prepared split's ``<split>/histories`` or the
        copy ``muse export --histories`` writes beside the package. DataError when it belongs to another
        vocabulary than the package's."""
        if isinstance(store, str):
            store = HistoryStore.open(store, fingerprint=self.manifest.get("vocab_fingerprint"),
                                      num_users=int(self.manifest["vocab_sizes"]["user"]))
        self.histories = store

    def user_history(self, user_id: int) -> tuple:
        """(user index int64 [1], profile indices int64 [5], item indices int64 [n], category indices int64 [n]) of a
        raw user id from the attached store, the newest ``max_seq_len`` behaviors the model was trained with (all
        when it was trained on whole histories). An unknown user has index 0, no history and profile 0."""
        if self.histories is None:
            raise ValueError("no history store attached: pass histories= to load() or call attach_histories(DIR)")
        user = self.indices("user", [user_id])
        items, cats = self.histories.history(int(user[0]))
        if self.max_seq_len is not None:
            items, cats = items[-self.max_seq_len:], cats[-self.max_seq_len:]
        profile = torch.from_numpy(self.histories.profile[int(user[0])].astype("int64"))
        return (user, profile, torch.from_numpy(items.astype("int64")), torch.from_numpy(cats.astype("int64")))

    @torch.no_grad()
    def rank_user(self, user_id: int, candidate_item_ids: IdsLike) -> torch.Tensor:
        """float32 [C] click probability of each candidate (raw item ids) for the raw ``user_id``, whose profile and
        history come from the attached store (``attach_histories``). Equal to ``rank`` with that history."""
        cand = self.indices("item", candidate_item_ids).reshape(-1)
        if cand.shape[0] == 0:
            return torch.zeros(0)
        user, profile, items, cats = self.user_history(user_id)
        return self.rank_indices(user, profile, cand, items, cats)

    # ---- ranking in vocabulary indices (what a server calls: ids mapped once, content rows prefetched) ----

    def indices(self, space: str, raw: IdsLike) -> torch.Tensor:
        """int64 vocabulary indices of raw hashed ids of the id space ``space`` (one of ``ID_SPACES``), same shape
        as ``raw``; 0 for unknown ids and for 0."""
        if space not in self.vocabs:
            raise ValueError(f"space: unknown id space {space!r} (expected one of {', '.join(ID_SPACES)})")
        return self.vocabs[space].lookup(torch.as_tensor(raw, dtype=torch.int64))

    def history_content(self, history_items: torch.Tensor) -> HistoryContent:
        """The ``HistoryContent`` of a history of item indices int64 [L] (oldest first): the multimodal rows of its
        distinct items, gathered once, so that ``rank_indices(..., content=...)`` of that history reads no history
        row of the big table (only the candidates' rows)."""
        items = history_items.reshape(-1).to(torch.int64)
        table, sq_norm = self.stage.mm_table.table, self.stage.mm_table.norms.sq_norm
        real = torch.nonzero(items != 0).reshape(-1)
        ids = items.index_select(0, real)
        distinct, inverse = torch.unique(ids, return_inverse=True)
        newest = torch.full((distinct.shape[0],), -1, dtype=torch.int64).scatter_reduce_(0, inverse, real, "amax")
        order = torch.argsort(newest)  # distinct items, oldest newest-occurrence first
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.shape[0])
        slots = torch.zeros_like(items)
        slots[real] = rank.index_select(0, inverse) + 1
        chosen = distinct.index_select(0, order)
        rows = torch.cat([table[:1], table.index_select(0, chosen)])
        return HistoryContent(slots, rows, torch.cat([sq_norm[:1], sq_norm.index_select(0, chosen)]),
                              torch.cat([torch.zeros(1, dtype=torch.int64), chosen]))

    @torch.no_grad()
    def rank_indices(self, user: torch.Tensor, profile: torch.Tensor, candidates: torch.Tensor,
                     history_items: torch.Tensor, history_cats: torch.Tensor,
                     candidate_cats: Optional[torch.Tensor] = None, candidate_cities: Optional[torch.Tensor] = None,
                     candidate_provinces: Optional[torch.Tensor] = None,
                     content: Optional[HistoryContent] = None) -> torch.Tensor:
        """float32 [C] click probability of each candidate for one user, everything in vocabulary indices.

        user: int64 [1]; profile: int64 [5] (profile_1..profile_5); candidates: int64 [C] item indices;
        history_items, history_cats: int64 [L], oldest first (0 = padding / unknown). candidate_cats,
        candidate_cities, candidate_provinces: int64 [C] the candidates' attribute indices (None: the package's
        item attributes). content: ``history_content(history_items)`` of this very history (a prefetch), or None
        (the rows are read from the big table). Equal to ``score`` of the C rows (same user and history, each
        candidate as the target, its attributes as given), with or without ``content``.

        The multimodal GSU (MUSE) scores the history against all C candidates in one ``cosine_topk`` over its
        distinct items, and the selected and recent behaviors go to the model directly (no second GSU pass);
        SIM-hard / DIN select on the few positions they can read; SIM-soft / TWIN read the whole history in the
        model, in groups of candidates.
        """
        cand = candidates.reshape(-1).to(torch.int64)
        c = cand.shape[0]
        if c == 0:
            return torch.zeros(0)
        items, cats = history_items.reshape(-1).to(torch.int64), history_cats.reshape(-1).to(torch.int64)
        if items.shape != cats.shape:
            raise ValueError(f"history_cats: length {cats.shape[0]} differs from history_items {items.shape[0]}")
        if content is not None and tuple(content.slots.shape) != tuple(items.shape):
            raise ValueError(f"content: {content.slots.shape[0]} positions for a history of {items.shape[0]} "
                             "(pass history_content of this history)")
        user, prof = user.reshape(1).to(torch.int64), profile.reshape(-1).to(torch.int64)
        if prof.shape[0] != len(PROFILE_FIELDS):
            raise ValueError(f"profile: {prof.shape[0]} ids, expected {len(PROFILE_FIELDS)} ({', '.join(PROFILE_FIELDS)})")
        given = (candidate_cats, candidate_cities, candidate_provinces)
        cat, city, prov = (g.reshape(-1).to(torch.int64) if g is not None else d.index_select(0, cand)
                           for g, d in zip(given, (self.items.category, self.items.city, self.items.province)))
        for name, values in zip(("candidate_cats", "candidate_cities", "candidate_provinces"), (cat, city, prov)):
            if values.shape[0] != c:
                raise ValueError(f"{name}: {values.shape[0]} values for {c} candidates")
        if self.config.gsu == "multimodal":  # straight to the model's rank_user, no [C, L] batch
            selected = self._shared_selection(cand, items, cats, content)
            sparse = {"user_id": user, "item_city": city, "item_province": prov,
                      **{field: prof[i:i + 1] for i, field in enumerate(PROFILE_FIELDS)}}
            sequence = {"target_item": cand, "target_cat": cat, "recent_item": selected.recent_item,
                        "recent_cat": selected.recent_cat, "gsu_item": selected.gsu_item, "gsu_cat": selected.gsu_cat}
            return torch.sigmoid(self.model.rank_user(sparse, sequence, selected.recent_scores, selected.gsu_scores,
                                                      selected.gsu_index))
        samples = RawBatch(labels=torch.zeros(c), user_id=user.expand(c), profile=prof[None, :].expand(c, -1),
                           target_item=cand, target_cat=cat, item_city=city, item_province=prov,
                           history_items=items[None, :].expand(c, -1), history_cats=cats[None, :].expand(c, -1))
        if self.config.uses_history:
            return self._rank_whole_history(samples, items, cats)
        keep = self._compact_positions(cand, cat, items, cats)
        compact = replace(samples, history_items=_left_padded(items, keep), history_cats=_left_padded(cats, keep))
        return self.score_indices(compact)

    def _shared_selection(self, cand: torch.Tensor, items: torch.Tensor, cats: torch.Tensor,
                          content: Optional[HistoryContent]) -> Selected:
        """What the multimodal GSU stage selects for C candidates sharing one history (``GsuStage.select`` of the
        C rows, without any [C, L] tensor): the recent window (the same for all, given once: in the first sample,
        for the model's ``shared_recent``; its cosines per candidate) and each candidate's top K, as ``gsu_index``
        into the selected positions given once (``Batch.gsu_index``; the model's ESU attends over them by index).

        With ``content``, the cosines are taken in a small table: the content rows, then the candidates' rows.
        Cosines of int8 rows are exact integer dot products over the stored norms and the GSU's filter bound
        uses the whole table's smallest norm (kept), and the top K ranks positions, not row numbers, so the
        selection and every score are the ones the whole table gives.
        """
        cfg, mm = self.config, self.stage.mm_table
        c, length = cand.shape[0], items.shape[0]
        if content is None:
            table, norms, targets, rows = mm.table, mm.norms, cand, items
        else:
            base = content.rows.shape[0]
            table = torch.cat([content.rows, mm.table.index_select(0, cand)])
            norms = RowNorms(torch.cat([content.sq_norm, mm.norms.sq_norm.index_select(0, cand)]),
                             mm.norms.min_norm, mm.norms.max_norm)
            targets, rows = torch.arange(base, base + c, dtype=torch.int64), content.slots
        real_pos = torch.nonzero((items != 0) | (cats != 0)).reshape(-1)
        recent = real_pos[max(0, real_pos.shape[0] - cfg.recent_len):] if cfg.recent_len else real_pos[:0]
        n_recent = recent.shape[0]
        recent_scores = torch.zeros(c, cfg.recent_len, dtype=torch.float32)
        if n_recent:
            recent_scores[:, :n_recent] = cross_cosines(table, norms, rows.index_select(0, recent), targets)
        width = min(cfg.k, length)
        if width and bool((items != 0).any()):
            if self.stage.approximate(length):  # the approximate GSU where the pipeline stage runs it
                index = self.stage.pq_index()
                if content is not None:  # the local table's codes: the distinct items', then the candidates'
                    index = PQIndex(index.codes.index_select(0, torch.cat([content.ids, cand])), index.codebooks,
                                    index.meta)
                scores, positions, valid = pq_topk(index, table, targets, rows[None, :].expand(c, -1), width,
                                                   candidates=cfg.pq_candidates, norms=norms,
                                                   chunk_rows=self.stage.chunk_rows)
            else:
                scores, positions, valid = cosine_topk(table, targets, rows[None, :].expand(c, -1), width,
                                                       norms=norms, chunk_rows=self.stage.chunk_rows)
            gsu_scores = torch.where(valid, scores, torch.zeros((), dtype=torch.float32))
            # each selected position once (U of them, ascending), and every slot as an index into them
            slots = torch.where(valid, positions, torch.full((), length)).reshape(-1)  # invalid: a spare last slot
            present = torch.zeros(length + 1, dtype=torch.bool).index_fill_(0, slots, True)[:length]
            distinct = torch.nonzero(present).reshape(-1)
            compact = torch.cumsum(present, 0) - 1
            index = torch.where(valid, compact.index_select(0, positions.clamp_min(0).reshape(-1)).view_as(positions), torch.full((), -1))
        else:
            gsu_scores = torch.zeros(c, width, dtype=torch.float32)
            distinct = torch.zeros(0, dtype=torch.int64)
            index = torch.full((c, width), -1, dtype=torch.int64)
        if gsu_scores.shape[1] < cfg.k:
            gsu_scores = torch.nn.functional.pad(gsu_scores, (0, cfg.k - gsu_scores.shape[1]))
            index = torch.nn.functional.pad(index, (0, cfg.k - index.shape[1]), value=-1)
        recent_lengths = torch.zeros(c, dtype=torch.int64)
        recent_lengths[0] = n_recent  # the window once, in the first sample: the model's ``shared_recent``
        gsu_lengths = torch.zeros(c, dtype=torch.int64)
        gsu_lengths[0] = distinct.shape[0]  # the U distinct selected behaviors once too: ``Batch.gsu_index``
        return Selected(recent_item=items.index_select(0, recent), recent_cat=cats.index_select(0, recent),
                        recent_lengths=recent_lengths, recent_scores=recent_scores,
                        gsu_item=items.index_select(0, distinct), gsu_cat=cats.index_select(0, distinct),
                        gsu_lengths=gsu_lengths, gsu_scores=gsu_scores, gsu_index=index)

    def _compact_positions(self, cand: torch.Tensor, cand_cat: torch.Tensor, items: torch.Tensor,
                           cats: torch.Tensor) -> torch.Tensor:
        """Per candidate, the only history positions the SIM-hard / DIN stage can read: the ``recent_len`` most
        recent real behaviors plus, for SIM-hard, the K most recent of the candidate's category, computed once for
        all candidates without any [C, L] tensor. Returns int64 [C, W] positions (W <= recent_len + K), ascending,
        -1 padding on the left. The stage run on these few positions selects exactly what it selects on the
        whole history (the recent window is the same, and so are the K newest of a category)."""
        cfg = self.config
        c = cand.shape[0]
        real_pos = torch.nonzero((items != 0) | (cats != 0)).reshape(-1)
        recent = real_pos[-cfg.recent_len:] if cfg.recent_len else real_pos[:0]
        picks = torch.full((c, 0), -1, dtype=torch.int64)
        if cfg.gsu == "category" and real_pos.numel():
            picks = torch.full((c, cfg.k), -1, dtype=torch.int64)
            for value in torch.unique(cand_cat).tolist():
                if value == 0:
                    continue
                same = torch.nonzero(cats == value).reshape(-1)[-cfg.k:]
                rows = torch.nonzero(cand_cat == value).reshape(-1)
                picks[rows, : same.numel()] = same
        merged = torch.cat([recent[None, :].expand(c, -1), picks], dim=1)
        merged = torch.sort(merged, dim=1).values
        # drop duplicates (a recent behavior also picked by the GSU) by marking repeats -1, then re-sort
        repeat = torch.zeros_like(merged, dtype=torch.bool)
        repeat[:, 1:] = merged[:, 1:] == merged[:, :-1]
        return torch.sort(torch.where(repeat, torch.full((), -1), merged), dim=1).values

    def _rank_whole_history(self, samples: RawBatch, items: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        """SIM-soft / TWIN select inside the model from the whole history: candidates in groups of
        ``_IN_MODEL_CHUNK / L`` rows, each with the full history (a broadcast view, never copied)."""
        c, length = samples.batch_size, items.shape[0]
        step = max(1, _IN_MODEL_CHUNK // max(1, length))
        out = []
        for s in range(0, c, step):
            n = min(step, c - s)
            part = RawBatch(labels=samples.labels[s:s + n], user_id=samples.user_id[s:s + n],
                            profile=samples.profile[s:s + n], target_item=samples.target_item[s:s + n],
                            target_cat=samples.target_cat[s:s + n], item_city=samples.item_city[s:s + n],
                            item_province=samples.item_province[s:s + n], history_items=items[None, :].expand(n, -1),
                            history_cats=cats[None, :].expand(n, -1))
            out.append(self.score_indices(part))
        return torch.cat(out)


def _left_padded(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values [L] at positions [C, W] (-1 = padding) -> int64 [C, W], 0 at padding (left), order kept."""
    return torch.where(positions >= 0, values[positions.clamp_min(0)], torch.zeros((), dtype=torch.int64))


# ---- the package entry ----


def load(importer: Any, verify: bool = True, histories: Optional[str] = None) -> Predictor:
    """Build the ``Predictor`` held by a ``torch.package.PackageImporter``.

    With ``verify`` (the default) every blob's size and sha256 are checked against the manifest first;
    a mismatch raises ``PackageIntegrityError`` naming the blob. ``histories``: a history store directory to serve
    users by id from (``Predictor.attach_histories``).
    """
    try:
        manifest = parse_manifest(importer.load_text(MANIFEST_PACKAGE, MANIFEST_NAME))
    except (RuntimeError, OSError, KeyError) as err:
        raise PackageIntegrityError(f"{MANIFEST_NAME}: missing or unreadable ({str(err).splitlines()[0] if str(err) else err!r})") from None
    tensors: Dict[str, torch.Tensor] = {}
    for name, entry in manifest["blobs"].items():
        try:
            data = importer.load_binary(BLOB_PACKAGE, name)
        except (RuntimeError, OSError, KeyError) as err:
            raise PackageIntegrityError(f"blob {name}: missing or unreadable (truncated or damaged package)") from None
        tensors[name] = decode_blob(name, data, entry, verify=verify, writable=name not in FROZEN_BLOBS)
        del data
    predictor = from_tensors(manifest, tensors)
    if histories is not None:
        predictor.attach_histories(histories)
    return predictor


def from_tensors(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Predictor:
    """The ``Predictor`` of a manifest and its decoded blobs (``weights.*``, ``mm_table``, ``vocab.*``, ``items.*``)."""
    config = ModelConfig.from_dict(dict(manifest["model"]))
    vocab_sizes = {k: int(v) for k, v in manifest["vocab_sizes"].items()}
    model = build_model(config, vocab_sizes, device="cpu")
    prefix = "weights."
    model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    vocabs = {space: VocabTable(tensors[f"vocab.{space}.keys"], tensors[f"vocab.{space}.index"]) for space in ID_SPACES}
    items = ItemSide(tensors["items.category"], tensors["items.city"], tensors["items.province"])
    return Predictor(config, model, MMTable(tensors["mm_table"]), vocabs, items, manifest)
