"""``Engine``: one loaded package answering rank and prefetch requests, with its own prefetch cache.

Loading (``load_engine``) checks the package byte for byte (``inference.loader.verify_package``), runs its entry
module, and builds its ``Predictor`` from the package's own ``from_tensors``, except that the multimodal table
(the largest blob, stored uncompressed in the zip) is memory-mapped from the package file instead of copied:
every worker of a host maps the same pages, so they share one copy through the page cache, as they share the
history store (``HistoryStore``, memory-mapped per worker).

Ranking follows the package's ``Predictor.rank`` / ``rank_user`` (same vocabularies, same GSU, same ESU), with
two additions: candidate side features from the request, and prefetched users. A prefetch (``UserRows``) holds
the user's indices, profile and history (the newest ``max_seq_len`` behaviors, as ``rank_user`` reads them) and,
for the multimodal GSU, the content rows of the history's distinct items (``LocalRows``), numbered in the order
of their newest occurrence. A rank of a prefetched user runs the package's GSU on that small table (plus the
candidates' rows): no read of the store or of the big table's history rows. Cosines of int8 rows are exact
integer dot products over stored norms, the GSU's bounds use the whole table's smallest and largest norms, and
the top-K ranks positions, not row numbers, so the selected behaviors, and the scores, are the ones the whole
table gives.
"""

import hashlib
import os
import struct
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch.package import PackageImporter

from common.errors import DataError, UserError
from datapipes.histories import HistoryStore
from inference.loader import verify_package
from inference.manifest import BLOB_PACKAGE, ENTRY_MODULE, MANIFEST_NAME, MANIFEST_PACKAGE
from serving.cache import PrefetchCache
from serving.schema import PROFILE_KEYS, RankRequest

MM_BLOB = "mm_table"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature ... name length, extra length
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class LocalRows:
    """A history's content rows for the multimodal GSU.

    history: int64 [L] each position's row in ``rows`` (0 = no content row: padding or an unknown item).
    rows: [U + 1, D] the table's dtype; row 0 zeros, rows 1..U the distinct items, oldest newest-occurrence first.
    sq_norm: [U + 1] their squared norms, copied from the table's ``RowNorms``.
    """

    history: torch.Tensor
    rows: torch.Tensor
    sq_norm: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.history, self.rows, self.sq_norm))


@dataclass(frozen=True)
class UserRows:
    """One user as a rank reads it: user int64 [1], profile int64 [5], items / cats int64 [L] (vocabulary indices,
    oldest first), local: ``LocalRows`` (multimodal GSU) or None."""

    user: torch.Tensor
    profile: torch.Tensor
    items: torch.Tensor
    cats: torch.Tensor
    local: Optional[LocalRows]

    @property
    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in (self.user, self.profile, self.items, self.cats))
        return own + (self.local.nbytes if self.local is not None else 0)


@dataclass(frozen=True)
class PackageInfo:
    """What /health reports of the loaded package."""

    path: str
    package_id: str  # sha256 of the manifest, which lists every blob's sha256
    model: str
    step: int
    created: str
    dataset: str
    mm_table_rows: int
    mm_table_mapped: bool
    histories: Optional[str]


def _mm_table_offset(path: str, record: str) -> Optional[int]:
    """Byte offset in ``path`` of the data of the zip member ``record`` when it is stored uncompressed, else None."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(record)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        magic, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if magic != _ZIP_LOCAL_MAGIC:
        raise DataError(f"{path}: {record}: no zip local header at its recorded offset (damaged package)")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _mapped_blob(path: str, records: Dict[str, str], entry: Dict[str, Any]) -> Optional[torch.Tensor]:
    """The int8 multimodal table mapped read-only from the package file, or None when it cannot be mapped."""
    record = records.get(f"{BLOB_PACKAGE.replace('.', '/')}/{MM_BLOB}")
    if record is None or entry["dtype"] != "int8" or int(entry["bytes"]) == 0:
        return None
    offset = _mm_table_offset(path, record)
    if offset is None:
        return None
    array = np.memmap(path, dtype=np.int8, mode="r", offset=offset, shape=tuple(int(s) for s in entry["shape"]))
    with warnings.catch_warnings():  # read-only memory: nothing ever writes to the multimodal table
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def load_engine(package: str, histories: Optional[str], config: Any, generation: int,
                on_cache_change=None) -> "Engine":
    """An ``Engine`` of the package file ``package`` (checked byte for byte first) and the history store
    ``histories`` (None: ``<package>.histories`` when it exists). ``DataError`` / ``UserError`` name the file."""
    path = os.path.abspath(package)
    if not os.path.isfile(path):
        raise UserError(f"--package {package}: no such file")
    manifest = verify_package(path)
    try:
        importer = PackageImporter(path)
        entry = importer.import_module(ENTRY_MODULE)
        manifest_text = importer.load_text(MANIFEST_PACKAGE, MANIFEST_NAME)
    except (RuntimeError, ImportError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: (package): cannot be opened as a torch.package ({first})") from None
    decode = importer.import_module("inference.manifest").decode_blob
    with zipfile.ZipFile(path) as archive:
        records = {name.split("/", 1)[1]: name for name in archive.namelist() if "/" in name}
    tensors = {}
    mapped = None
    for name, blob in manifest["blobs"].items():
        if name == MM_BLOB:
            mapped = _mapped_blob(path, records, blob)
            if mapped is not None:
                tensors[name] = mapped
                continue
        # verify_package has just checked every blob's sha256
        tensors[name] = decode(name, importer.load_binary(BLOB_PACKAGE, name), blob, verify=False,
                               writable=name != MM_BLOB)
    predictor = entry.from_tensors(manifest, tensors)
    if histories is None and os.path.isdir(f"{path}.histories"):
        histories = f"{path}.histories"
    if histories is not None:
        if not os.path.isdir(histories):
            raise UserError(f"--histories {histories}: not a directory (a history store: DATA/<split>/histories)")
        predictor.attach_histories(HistoryStore.open(histories, fingerprint=manifest.get("vocab_fingerprint"),
                                                     num_users=int(manifest["vocab_sizes"]["user"])))
    info = PackageInfo(path=path, package_id=hashlib.sha256(manifest_text.encode("utf-8")).hexdigest(),
                       model=predictor.config.name, step=int(manifest["run"]["step"]), created=str(manifest["created"]),
                       dataset=str(manifest["dataset"]["path"]), mm_table_rows=int(predictor.stage.mm_table.num_rows),
                       mm_table_mapped=mapped is not None,
                       histories=os.path.abspath(histories) if histories is not None else None)
    cache = PrefetchCache(config.cache_bytes, config.cache_users, on_cache_change)
    return Engine(predictor, entry, info, cache, generation)


class Engine:
    """Rank and prefetch on one loaded package. predictor: the package's ``Predictor``; entry: its entry module
    (``RawBatch``, ``_left_padded``); cache: this engine's ``PrefetchCache`` (a reload starts an empty one)."""

    def __init__(self, predictor: Any, entry: Any, info: PackageInfo, cache: PrefetchCache, generation: int) -> None:
        self.predictor, self.entry, self.info, self.cache, self.generation = predictor, entry, info, cache, generation
        self.table = predictor.stage.mm_table.table
        self.norms = predictor.stage.mm_table.norms
        self.local_gsu = predictor.config.gsu == "multimodal" and not predictor.config.uses_history

    @property
    def has_store(self) -> bool:
        return self.predictor.histories is not None

    # ---- users ----

    def read_user(self, user_id: int) -> UserRows:
        """A user's rows from the store: the package's ``user_history`` plus, for the multimodal GSU, its
        ``LocalRows``. ValueError when no store is attached."""
        user, profile, items, cats = self.predictor.user_history(user_id)
        return UserRows(user, profile, items, cats, self._local_rows(items) if self.local_gsu else None)

    def _local_rows(self, items: torch.Tensor) -> LocalRows:
        real = torch.nonzero(items != 0).reshape(-1)
        ids = items.index_select(0, real)
        distinct, inverse = torch.unique(ids, return_inverse=True)
        newest = torch.full((distinct.shape[0],), -1, dtype=torch.int64).scatter_reduce_(0, inverse, real, "amax")
        order = torch.argsort(newest)  # distinct items, oldest newest-occurrence first (the GSU's scan order)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.shape[0])
        history = torch.zeros_like(items)
        history[real] = rank.index_select(0, inverse) + 1
        chosen = distinct.index_select(0, order)
        rows = torch.cat([self.table[:1], self.table.index_select(0, chosen)])
        sq = torch.cat([self.norms.sq_norm[:1], self.norms.sq_norm.index_select(0, chosen)])
        return LocalRows(history, rows, sq)

    def prefetch(self, user_id: int) -> Tuple[UserRows, bool]:
        """(the user's rows, whether they were cached already); keeps them in the cache."""
        return self.cache.prefetch(user_id, lambda: self.read_user(user_id))

    # ---- ranking ----

    def rank(self, request: RankRequest) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """(float32 [C] click probability per candidate, facts for the response: history length, cache use)."""
        p = self.predictor
        cand = p._map("item", torch.from_numpy(request.candidates))
        if request.explicit_history:
            user = p._map("user", [request.user_id or 0])
            prof = torch.cat([p._map(f, [request.profile.get(f, 0)]) for f in PROFILE_KEYS])
            rows = UserRows(user, prof, p._map("item", torch.from_numpy(request.history_items)),
                            p._map("category", torch.from_numpy(request.history_categories)), None)
            cache = "none"
        else:
            rows = self.cache.lookup(request.user_id)
            cache = "hit" if rows is not None else "miss"
            if rows is None:
                user, profile, items, cats = p.user_history(request.user_id)
                rows = UserRows(user, profile, items, cats, None)
        facts = {"history_length": int(rows.items.shape[0]), "cache": cache}
        if cand.shape[0] == 0:
            return torch.zeros(0), facts
        side = {k: torch.from_numpy(v) for k, v in request.side.items()}
        cat, city, prov = p._item_attributes(cand, side.get("candidate_categories"), side.get("candidate_cities"),
                                             side.get("candidate_provinces"))
        with torch.no_grad():
            return self._score(rows, cand, cat, city, prov), facts

    def _score(self, rows: UserRows, cand: torch.Tensor, cat: torch.Tensor, city: torch.Tensor,
               prov: torch.Tensor) -> torch.Tensor:
        """``Predictor._rank_indices`` with given candidate attributes and, when prefetched, the local rows."""
        p, c = self.predictor, cand.shape[0]
        if p.config.uses_history:
            return p._rank_whole_history(rows.user, rows.profile, cand, cat, city, prov, rows.items, rows.cats)
        if rows.local is not None:
            keep = self._local_positions(rows, cand, cat)
        else:
            keep = p._compact_positions(cand, cat, rows.items, rows.cats)
        raw = self.entry.RawBatch(labels=torch.zeros(c), user_id=rows.user.expand(c),
                                  profile=rows.profile[None, :].expand(c, -1), target_item=cand, target_cat=cat,
                                  item_city=city, item_province=prov,
                                  history_items=self.entry._left_padded(rows.items, keep),
                                  history_cats=self.entry._left_padded(rows.cats, keep))
        return p.score_indices(raw)

    def _local_positions(self, rows: UserRows, cand: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        """The package's ``Predictor._compact_positions`` run on the prefetched rows plus the candidates' rows:
        positions int64 [C, W], the same the whole table gives (see the module docstring)."""
        local = rows.local
        base = local.rows.shape[0]
        table = torch.cat([local.rows, self.table.index_select(0, cand)])
        norms = type(self.norms)(torch.cat([local.sq_norm, self.norms.sq_norm.index_select(0, cand)]),
                                 self.norms.min_norm, self.norms.max_norm)
        view = _StageView(self.predictor.config, table, norms, self.predictor.stage.chunk_rows)
        targets = torch.arange(base, base + cand.shape[0], dtype=torch.int64)
        return type(self.predictor)._compact_positions(view, targets, cat, local.history, rows.cats)


class _Table:
    def __init__(self, table: torch.Tensor, norms: Any) -> None:
        self.table, self.norms = table, norms


class _Stage:
    def __init__(self, table: torch.Tensor, norms: Any, chunk_rows: Optional[int]) -> None:
        self.mm_table, self.chunk_rows = _Table(table, norms), chunk_rows


class _StageView:
    """What ``Predictor._compact_positions`` reads of its predictor (config, stage.mm_table, stage.chunk_rows),
    over another table."""

    def __init__(self, config: Any, table: torch.Tensor, norms: Any, chunk_rows: Optional[int]) -> None:
        self.config, self.stage = config, _Stage(table, norms, chunk_rows)
