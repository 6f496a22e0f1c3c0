"""Request bodies of the service, parsed and checked before any model code runs.

``POST /rank`` (one JSON object; raw hashed ids, as ``muse export``'s ``Predictor.rank`` takes them)::

    candidates             [C] item ids to score (required; C <= --max-candidates)
    user_id                the user; with no explicit history, its profile and history come from the history store
    history_items          [L] explicit history, oldest first (L <= --max-history); with history_categories
    history_categories     [L] their category ids
    profile                {"profile_1": id, ..., "profile_5": id} with an explicit history (missing: unknown)
    candidate_categories, candidate_cities, candidate_provinces
                           [C] side features of the candidates (default: the package's item attributes)

``POST /prefetch``: ``{"user_id": id}``. Every id is a JSON integer in the int64 range; ``true``, ``1.0`` or
``"1"`` are refused. Anything else (malformed JSON, a non-object, an unknown field, a wrong type, lists of
unequal lengths, too many candidates) raises ``BadRequest`` with one message naming the field.
"""

import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np

PROFILE_KEYS = tuple(f"profile_{i}" for i in range(1, 6))
RANK_FIELDS = ("candidates", "user_id", "history_items", "history_categories", "profile", "candidate_categories",
               "candidate_cities", "candidate_provinces")
PREFETCH_FIELDS = ("user_id",)
SIDE_FIELDS = ("candidate_categories", "candidate_cities", "candidate_provinces")
_INT64 = np.iinfo(np.int64)


class BadRequest(Exception):
    """A request the service refuses: HTTP ``status`` (4xx), one-line ``message``, ``kind`` for the error metric."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _invalid(message: str) -> BadRequest:
    return BadRequest(422, message, "invalid_request")


@dataclass(frozen=True)
class Limits:
    """Longest lists a rank request may carry."""

    max_candidates: int
    max_history: int


@dataclass(frozen=True)
class RankRequest:
    """A checked rank request. candidates int64 [C]; history_items / history_categories int64 [L] or None (then
    ``user_id`` is set and the history comes from the store); profile: the given profile ids; side: the given
    candidate side features, each int64 [C]."""

    candidates: np.ndarray
    user_id: Optional[int]
    history_items: Optional[np.ndarray]
    history_categories: Optional[np.ndarray]
    profile: Dict[str, int]
    side: Dict[str, np.ndarray]

    @property
    def explicit_history(self) -> bool:
        return self.history_items is not None


@dataclass(frozen=True)
class PrefetchRequest:
    user_id: int


def parse_object(body: bytes) -> Dict[str, Any]:
    """The JSON object of a request body; ``BadRequest`` 400 when it is not UTF-8 JSON or not an object."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as err:
        raise BadRequest(400, f"body: not valid JSON ({err})", "malformed_json") from None
    except RecursionError:
        raise BadRequest(400, "body: JSON nested too deeply", "malformed_json") from None
    if not isinstance(value, dict):
        raise BadRequest(400, f"body: expected a JSON object, got {_type_name(value)}", "malformed_json")
    return value


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", float: "a number with a fraction",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_fields(obj: Mapping[str, Any], allowed: tuple) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise _invalid(f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})")


def _id(value: Any, field: str) -> int:
    if type(value) is not int:
        raise _invalid(f"{field}: expected an integer id, got {_type_name(value)} {json.dumps(value)[:40]}")
    if not _INT64.min <= value <= _INT64.max:
        raise _invalid(f"{field}: id {value} outside the int64 range")
    return value


def _ids(value: Any, field: str, limit: int, limit_flag: str) -> np.ndarray:
    """int64 [n] of a JSON array of integer ids, n <= limit."""
    if not isinstance(value, list):
        raise _invalid(f"{field}: expected an array of integer ids, got {_type_name(value)}")
    if len(value) > limit:
        raise _invalid(f"{field}: {len(value):,} ids, at most {limit:,} per request ({limit_flag})")
    if value and set(map(type, value)) != {int}:
        index = next(i for i, v in enumerate(value) if type(v) is not int)
        _id(value[index], f"{field}[{index}]")
    try:
        return np.array(value, dtype=np.int64)
    except OverflowError:
        index = next(i for i, v in enumerate(value) if not _INT64.min <= v <= _INT64.max)
        raise _invalid(f"{field}[{index}]: id {value[index]} outside the int64 range") from None


def rank_request(obj: Mapping[str, Any], limits: Limits) -> RankRequest:
    """The checked ``RankRequest`` of a parsed body (see the module docstring); ``BadRequest`` 422 otherwise."""
    _check_fields(obj, RANK_FIELDS)
    if "candidates" not in obj:
        raise _invalid("candidates: required (the item ids to score)")
    candidates = _ids(obj["candidates"], "candidates", limits.max_candidates, "--max-candidates")
    user_id = _id(obj["user_id"], "user_id") if obj.get("user_id") is not None else None
    given = [f for f in ("history_items", "history_categories") if f in obj]
    if len(given) == 1:
        other = "history_categories" if given[0] == "history_items" else "history_items"
        raise _invalid(f"{other}: required with {given[0]} (an explicit history gives both)")
    items = cats = None
    if given:
        items = _ids(obj["history_items"], "history_items", limits.max_history, "--max-history")
        cats = _ids(obj["history_categories"], "history_categories", limits.max_history, "--max-history")
        if items.shape != cats.shape:
            raise _invalid(f"history_categories: {cats.shape[0]:,} ids for {items.shape[0]:,} history_items")
    elif user_id is None:
        raise _invalid("user_id: required unless the request gives history_items and history_categories")
    profile: Dict[str, int] = {}
    if obj.get("profile") is not None:
        if not given:
            raise _invalid("profile: only with an explicit history (a user id's profile comes from the store)")
        if not isinstance(obj["profile"], dict):
            raise _invalid(f"profile: expected an object of profile_1..profile_5 ids, got {_type_name(obj['profile'])}")
        _check_fields(obj["profile"], PROFILE_KEYS)
        profile = {k: _id(v, f"profile.{k}") for k, v in obj["profile"].items()}
    side = {}
    for field in SIDE_FIELDS:
        if obj.get(field) is not None:
            side[field] = _ids(obj[field], field, limits.max_candidates, "--max-candidates")
            if side[field].shape != candidates.shape:
                raise _invalid(f"{field}: {side[field].shape[0]:,} ids for {candidates.shape[0]:,} candidates")
    return RankRequest(candidates, user_id, items, cats, profile, side)


def prefetch_request(obj: Mapping[str, Any]) -> PrefetchRequest:
    """The checked ``PrefetchRequest`` of a parsed body; ``BadRequest`` 422 otherwise."""
    _check_fields(obj, PREFETCH_FIELDS)
    if obj.get("user_id") is None:
        raise _invalid("user_id: required (the user whose history to prefetch)")
    return PrefetchRequest(_id(obj["user_id"], "user_id"))
