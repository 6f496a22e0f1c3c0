"""The package manifest: what an exported model holds and the sha256 of every tensor in it.

Shipped inside the package (interned) and used by both sides, so it imports only the standard library
and torch. Every tensor (weights, the frozen multimodal table, the vocabularies, the item attributes)
is stored as one raw blob (the exporting machine's byte order, little-endian on x86 and ARM) ``BLOB_PACKAGE/<name>``; the manifest records its dtype, shape,
byte size and sha256. ``decode_blob`` refuses a blob whose bytes do not match.
"""

import hashlib
import json
import warnings
from typing import Any, Dict, Mapping

import torch

FORMAT_VERSION = 1
MANIFEST_PACKAGE = "muse"
MANIFEST_NAME = "manifest.json"
BLOB_PACKAGE = "muse.blobs"
ENTRY_MODULE = "inference.predictor"

_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool)}


class PackageIntegrityError(ValueError):
    """The package's bytes do not match its manifest (tampered, truncated or damaged)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_to_blob(tensor: torch.Tensor) -> tuple[bytes, Dict[str, Any]]:
    """(raw bytes, manifest entry {dtype, shape, bytes, sha256}) of a CPU tensor."""
    t = tensor.detach().cpu().contiguous()
    dtype = str(t.dtype).replace("torch.", "")
    if dtype not in _DTYPES:
        raise ValueError(f"tensor: dtype {t.dtype} cannot be stored in a package blob")
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return data, {"dtype": dtype, "shape": list(t.shape), "bytes": len(data), "sha256": sha256_hex(data)}


def check_digest(name: str, size: int, digest: str, entry: Mapping[str, Any]) -> None:
    """Raise ``PackageIntegrityError`` unless a blob's size and sha256 hex digest are the manifest's."""
    if size != int(entry["bytes"]):
        raise PackageIntegrityError(f"blob {name}: {size} bytes, manifest says {entry['bytes']} (truncated or tampered package)")
    if digest != entry["sha256"]:
        raise PackageIntegrityError(f"blob {name}: sha256 does not match the manifest (tampered or damaged package)")


def check_blob(name: str, data: bytes, entry: Mapping[str, Any]) -> None:
    """``check_digest`` of the bytes of one blob."""
    check_digest(name, len(data), sha256_hex(data), entry)


def decode_blob(name: str, data: bytes, entry: Mapping[str, Any], verify: bool = True, writable: bool = True) -> torch.Tensor:
    """The tensor of one blob, after ``check_blob`` when ``verify``. ``writable=False`` shares ``data``'s
    memory instead of copying it (for frozen tensors such as the multimodal table)."""
    if verify:
        check_blob(name, data, entry)
    dtype = _DTYPES[entry["dtype"]]
    shape = [int(s) for s in entry["shape"]]
    if not data:
        return torch.empty(shape, dtype=dtype)
    if writable:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
    with warnings.catch_warnings():  # a read-only buffer: nothing ever writes to this tensor
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)


def parse_manifest(text: str) -> Dict[str, Any]:
    """The manifest dict; ``PackageIntegrityError`` if it is not a manifest of this format."""
    try:
        manifest = json.loads(text)
    except ValueError as err:
        raise PackageIntegrityError(f"{MANIFEST_NAME}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION or "blobs" not in manifest:
        raise PackageIntegrityError(f"{MANIFEST_NAME}: not a muse package manifest of format {FORMAT_VERSION}")
    return manifest
