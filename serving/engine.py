"""``Engine``: one loaded package answering rank and prefetch requests, with its own prefetch cache.

Loading (``load_engine``) checks the package byte for byte (``inference.loader.verify_package``), runs its entry
module, and builds its ``Predictor`` from the package's own ``from_tensors``, except that the multimodal table
(the largest blob, stored uncompressed in the zip) is memory-mapped from the package file instead of copied:
every worker of a host maps the same pages, so they share one copy through the page cache, as they share the
history store (``HistoryStore``, memory-mapped per worker).

Ranking uses only the package predictor's public API: ``indices`` (raw ids -> vocabulary indices, once per
request), ``user_history`` (a user's profile and history from the store) and ``rank_indices`` (the candidates
with their side features from the request, and, for a prefetched user, the ``history_content`` gathered at the
prefetch: the content rows of the history's distinct items, so a rank reads neither the store nor the big
table's history rows; the scores are the ones the whole table gives, see ``Predictor.rank_indices``).

A package exported before ``rank_indices`` existed carries its own older predictor (the package interns its
code): it is served through its public ``rank`` / ``rank_user`` (``legacy``: no candidate side features, and a
prefetch only warms the page cache); re-export it for the rest.
"""

import hashlib
import os
import struct
import time
import warnings
import weakref
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.package import PackageImporter

from common.errors import DataError, UserError
from datapipes.histories import HistoryStore
from inference.loader import attach_pq, verify_package
from inference.manifest import BLOB_PACKAGE, ENTRY_MODULE, MANIFEST_NAME, MANIFEST_PACKAGE
from serving.cache import PrefetchCache
from serving.rank_processes import PART_TIMEOUT, RankProcesses, part_message
from serving.schema import PROFILE_KEYS, BadRequest, RankRequest

MM_BLOB = "mm_table"
# Request side-feature field -> the id space its raw ids are mapped through.
SIDE_SPACES = {"candidate_categories": "category", "candidate_cities": "item_city",
               "candidate_provinces": "item_province"}
# Engine.rank: rank_indices keyword -> request side-feature field; fewest candidates worth a part of their own.
_SIDE_ARGS = {"candidate_cats": "candidate_categories", "candidate_cities": "candidate_cities",
              "candidate_provinces": "candidate_provinces"}
MIN_PART = 64
LEARN_RATE = 0.3  # Engine._learn: weight of the last rank in the worker's share of the candidates
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature ... name length, extra length
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class UserRows:
    """One user as a rank reads it: user int64 [1], profile int64 [5], items / cats int64 [L] (vocabulary indices,
    oldest first), local: the package's ``HistoryContent`` of the history (multimodal GSU, prefetched) or None."""

    user: torch.Tensor
    profile: torch.Tensor
    items: torch.Tensor
    cats: torch.Tensor
    local: Optional[Any]

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
    legacy: bool  # exported before Predictor.rank_indices: served through rank / rank_user (module docstring)
    kernels: Dict[str, str]  # the package's C kernels: "native", or "torch fallback: <why>" (``kernel_status``)


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


# The package's C kernels /health reports: name -> (module, symbol). Each is built (or found in the kernel cache) when
# the engine loads, so a first rank does not wait for a compiler.
KERNELS = {"gsu_filter": ("model.gsu.native", "muse_gather_dots_i8"),
           "gsu_dense_select": ("model.gsu.dense_select", "muse_dense_select"),
           "pq_scan": ("model.gsu.pq_native", "muse_pq_scan"), "dice": ("model.dice_native", "muse_dice_"),
           "din": ("model.din_native", "muse_din_scores"), "esu": ("model.esu_native", "muse_esu_attend")}


def kernel_status(importer: PackageImporter) -> Dict[str, str]:
    """{kernel: "native" or "torch fallback: <why>"} for the C kernels of a package's own code (``KERNELS``); a
    package exported before a kernel existed says so."""
    status = {}
    for name, (module_name, symbol) in KERNELS.items():
        try:
            module = importer.import_module(module_name)
        except ImportError:
            status[name] = "not in this package (exported before it)"
            continue
        if hasattr(module, "LIBRARY"):
            ready, why = module.LIBRARY.function(symbol) is not None, module.LIBRARY.reason()
        else:
            ready, why = module.library() is not None, module.unavailable_reason()
        status[name] = "native" if ready else f"torch fallback: {why}"
    return status


def load_engine(package: str, histories: Optional[str], config: Any, generation: int,
                on_cache_change=None) -> "Engine":
    """An ``Engine`` of the package file ``package`` (checked byte for byte first) and the history store
    ``histories`` (None: ``<package>.histories`` when it exists). ``DataError`` / ``UserError`` name the file.
    ``config.rank_parts`` P > 1 (``ServeConfig.rank_parts``; absent: 1): the engine also starts P - 1 helper
    processes (``serving.rank_processes``), which load the package while this process does."""
    path = os.path.abspath(package)
    if not os.path.isfile(path):
        raise UserError(f"--package {package}: no such file")
    processes = getattr(config, "rank_parts", 1)
    helpers = RankProcesses(processes - 1, path) if processes > 1 else None
    try:
        engine = _load(path, histories, config, generation, on_cache_change, helpers)
    except BaseException:
        if helpers is not None:
            helpers.close()
        raise
    if helpers is not None:
        if engine.info.legacy:
            helpers.close()
            engine.helpers = None
        else:
            helpers.await_ready(engine.info.package_id)
    return engine


def _load(path: str, histories: Optional[str], config: Any, generation: int, on_cache_change: Any,
          helpers: Optional[RankProcesses]) -> "Engine":
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
    attach_pq(importer, manifest, predictor, tensors)  # an approximate-GSU package's codes, not rebuilt
    if histories is None and os.path.isdir(f"{path}.histories"):
        histories = f"{path}.histories"
    if histories is not None:
        if not os.path.isdir(histories):
            raise UserError(f"--histories {histories}: not a directory (a history store: DATA/<split>/histories)")
        if not hasattr(predictor, "user_history"):
            raise UserError(f"--histories {histories}: the package {path} predates history stores (re-export it)")
        predictor.attach_histories(HistoryStore.open(histories, fingerprint=manifest.get("vocab_fingerprint"),
                                                     num_users=int(manifest["vocab_sizes"]["user"])))
    info = PackageInfo(path=path, package_id=hashlib.sha256(manifest_text.encode("utf-8")).hexdigest(),
                       model=predictor.config.name, step=int(manifest["run"]["step"]), created=str(manifest["created"]),
                       dataset=str(manifest["dataset"]["path"]), mm_table_rows=int(predictor.stage.mm_table.num_rows),
                       mm_table_mapped=mapped is not None,
                       histories=os.path.abspath(histories) if histories is not None else None,
                       legacy=not callable(getattr(predictor, "rank_indices", None)), kernels=kernel_status(importer))
    cache = PrefetchCache(config.cache_bytes, config.cache_users, on_cache_change)
    content_type = None if info.legacy else getattr(importer.import_module("inference.predictor"), "HistoryContent", None)
    return Engine(predictor, info, cache, generation, helpers=helpers, content_type=content_type)




def _parts(count: int, lanes: int) -> List[slice]:
    """``count`` candidates in at most ``lanes`` contiguous parts of at least ``MIN_PART`` (one part: all)."""
    n = max(1, min(lanes, count // MIN_PART))
    bounds = [count * i // n for i in range(n + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(n)]


class Engine:
    """Rank and prefetch on one loaded package. predictor: the package's ``Predictor``; cache: this engine's
    ``PrefetchCache`` (a reload starts an empty one); helpers: its ``RankProcesses`` or None: a rank's candidates
    are scored in up to 1 + (ready helpers) parts at once, the first in the calling thread and each other in a
    helper process (a candidate's score does not depend on the others, so the scores are those of one call, to
    float32 rounding); content_type: the package's ``HistoryContent`` (None for a legacy package). The helpers
    are closed when the engine is freed."""

    def __init__(self, predictor: Any, info: PackageInfo, cache: PrefetchCache, generation: int,
                 helpers: Optional[RankProcesses] = None, content_type: Any = None) -> None:
        self.predictor, self.info, self.cache, self.generation = predictor, info, cache, generation
        self.helpers, self.content_type = helpers, content_type
        self.local_share: Optional[float] = None  # of a rank's candidates, for this process (``_learn``)
        if helpers is not None:
            weakref.finalize(self, helpers.close)
        config = predictor.config
        self.local_gsu = not info.legacy and config.gsu == "multimodal" and not config.uses_history

    def rank_processes(self) -> Dict[str, int]:
        """{"processes": this one plus its helpers, "ready": this one plus the helpers ready now} (/health)."""
        described = self.helpers.describe() if self.helpers is not None else {"helpers": 0, "ready": 0}
        return {"processes": 1 + described["helpers"], "ready": 1 + described["ready"]}

    @property
    def has_store(self) -> bool:
        return getattr(self.predictor, "histories", None) is not None

    # ---- users ----

    def read_user(self, user_id: int) -> UserRows:
        """A user's rows from the store: the package's ``user_history`` plus, for the multimodal GSU, its
        ``history_content``. ValueError when no store is attached."""
        user, profile, items, cats = self.predictor.user_history(user_id)
        local = self.predictor.history_content(items) if self.local_gsu else None
        return UserRows(user, profile, items, cats, local)

    def prefetch(self, user_id: int) -> Tuple[UserRows, bool]:
        """(the user's rows, whether they were cached already); keeps them in the cache."""
        return self.cache.prefetch(user_id, lambda: self.read_user(user_id))

    # ---- ranking ----

    def rank(self, request: RankRequest) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """(float32 [C] click probability per candidate, facts for the response: history length, cache use)."""
        if self.info.legacy:
            return self._rank_legacy(request)
        p = self.predictor
        cand = p.indices("item", torch.from_numpy(request.candidates))
        if request.explicit_history:
            user = p.indices("user", [request.user_id or 0])
            prof = torch.cat([p.indices(f, [request.profile.get(f, 0)]) for f in PROFILE_KEYS])
            rows = UserRows(user, prof, p.indices("item", torch.from_numpy(request.history_items)),
                            p.indices("category", torch.from_numpy(request.history_categories)), None)
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
        side = {field: p.indices(space, torch.from_numpy(request.side[field]))
                for field, space in SIDE_SPACES.items() if field in request.side}
        helpers = self.helpers.acquire() if self.helpers is not None else None  # None: not ours this rank
        try:
            return self._rank_parts(rows, cand, side, helpers or []), facts
        finally:
            if helpers is not None:
                self.helpers.release(helpers)

    def _rank_parts(self, rows: UserRows, cand: torch.Tensor, side: Dict[str, torch.Tensor],
                    helpers: List[Any]) -> torch.Tensor:
        """Scores [C]: the first part here, one part per helper in ``helpers`` (sent first, collected after); a
        part whose helper fails or answers an error is scored here too."""
        p = self.predictor
        parts = self._split(cand.shape[0], len(helpers))
        # A prefetched user's content rows (``rows.local``) travel with each part; a history given in the request
        # (no content rows) is read from the memory-mapped table by each part itself, in parallel, which is what
        # gathering its content here first would cost before any part could start.

        def given(part: slice) -> Dict[str, Optional[torch.Tensor]]:
            return {name: side[field][part] if field in side else None for name, field in _SIDE_ARGS.items()}

        def score(part: slice) -> torch.Tensor:
            with torch.inference_mode():  # less dispatch work a tensor op than no_grad
                return p.rank_indices(rows.user, rows.profile, cand[part], rows.items, rows.cats, content=rows.local,
                                      **given(part))

        sent = {}
        for i, helper in enumerate(helpers[:len(parts) - 1], start=1):
            try:
                message = part_message(rows.user, rows.profile, cand[parts[i]], rows.items, rows.cats, given(parts[i]),
                                       rows.local)
            except Exception:  # noqa: BLE001 - a part that cannot travel is scored here
                continue
            helper.send(message)
            sent[i] = helper
        results: Dict[int, torch.Tensor] = {}
        took: Dict[int, float] = {}  # seconds each part took
        start = time.perf_counter()
        try:
            results[0] = score(parts[0])
        finally:  # every answer is read, even when this part raised: the next rank must not find it in the pipe
            took[0] = time.perf_counter() - start
            for i, helper in sent.items():
                answer = helper.receive(parts[i].stop - parts[i].start, PART_TIMEOUT)
                if answer is not None:
                    results[i] = answer
                    waited = time.perf_counter() - start - took[0]  # ~0: it was done before this process
                    took[i] = took[0] + waited if waited > 1e-3 else min(took[0], helper.elapsed)
        self._learn(parts, took)
        for i, part in enumerate(parts):  # a part whose helper failed or answered an error: here
            if i not in results:
                results[i] = score(part)
        return torch.cat([results[i] for i in range(len(parts))])

    def _split(self, count: int, helpers: int) -> List[slice]:
        """The parts of ``count`` candidates over this process and ``helpers`` helpers: ``_parts``, with this
        process's part sized by ``local_share`` once ranks have measured it (the helpers' parts equal)."""
        parts = _parts(count, 1 + helpers)
        n = len(parts)
        if n < 2 or self.local_share is None:
            return parts
        first = min(max(int(round(count * self.local_share)), MIN_PART), count - MIN_PART * (n - 1))
        bounds = [first + (count - first) * i // (n - 1) for i in range(n)]
        return [slice(0, first)] + [slice(bounds[i], bounds[i + 1]) for i in range(n - 1)]

    def _learn(self, parts: List[slice], took: Dict[int, float]) -> None:
        """Move ``local_share`` toward the share of candidates this process scored in the time the helpers took
        for theirs (speeds as candidates a second; a helper also pays for its message), so that the parts end
        together: on this host a helper's part of a 100,000-behavior rank ended ~25 ms after the worker's
        (a 6 MB message)."""
        rates = {i: (parts[i].stop - parts[i].start) / took[i] for i in took if took[i] > 0}
        if 0 not in rates or len(rates) < 2:
            return
        observed = rates[0] / sum(rates.values())
        share = observed if self.local_share is None else (1 - LEARN_RATE) * self.local_share + LEARN_RATE * observed
        self.local_share = min(max(share, 0.5 / len(parts)), 1.5 / len(parts))

    def _rank_legacy(self, request: RankRequest) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """``rank`` on a package older than ``rank_indices``: its public ``rank`` / ``rank_user``."""
        if request.side:
            field = sorted(request.side)[0]
            raise BadRequest(422, f"{field}: this package was exported before candidate side features were served "
                             "(re-export it with muse export)", "invalid_request")
        p, candidates = self.predictor, torch.from_numpy(request.candidates)
        if request.explicit_history:
            features = {"user_id": request.user_id or 0, **request.profile}
            scores = p.rank(features, torch.from_numpy(request.history_items),
                            torch.from_numpy(request.history_categories), candidates)
            return scores, {"history_length": int(request.history_items.shape[0]), "cache": "none"}
        rows = self.cache.lookup(request.user_id)
        cache = "hit" if rows is not None else "miss"
        length = int(rows.items.shape[0]) if rows is not None else int(p.user_history(request.user_id)[2].shape[0])
        return p.rank_user(request.user_id, candidates), {"history_length": length, "cache": cache}
