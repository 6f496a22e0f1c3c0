"""Load an exported package in this project: check it byte for byte first, then run its entry.

``verify_package`` reads the package as a plain zip archive (no package code runs): the manifest must be
there and every blob it lists must be present with the recorded size and sha256 (zip's own CRC-32 is
checked on the way). Any failure is one ``DataError`` naming the file and the blob. Only then is the
package opened with ``torch.package.PackageImporter`` and its entry (``inference.predictor.load``) run; a model
on the approximate GSU then gets the package's PQ codes (``attach_pq``).
A torch.package executes the code it holds: load packages from trusted sources only.
"""

import hashlib
import os
import zipfile
from typing import Any, Dict, Optional

from torch.package import PackageImporter

from common.errors import DataError, UserError
from common.io import path_manager
from datapipes.histories import HistoryStore
from inference.manifest import (BLOB_PACKAGE, ENTRY_MODULE, MANIFEST_NAME, MANIFEST_PACKAGE, PackageIntegrityError,
                                check_digest, decode_blob, parse_manifest)


def _local(path: str) -> str:
    if not path_manager.exists(path):
        raise UserError(f"--package {path}: no such file")
    local = path_manager.get_local_path(path)
    if os.path.isdir(local):
        raise UserError(f"--package {path}: is a directory, expected a .pt package file")
    return local


def _stream_digest(archive: zipfile.ZipFile, record: str, piece: int = 16 << 20) -> tuple[int, str]:
    """(size, sha256 hex) of one archive member, read in pieces (zip's CRC-32 is checked at the end)."""
    digest, size = hashlib.sha256(), 0
    with archive.open(record) as f:
        while chunk := f.read(piece):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def verify_package(path: str) -> Dict[str, Any]:
    """The manifest of the package at ``path`` after checking every blob; ``DataError`` if anything differs."""
    local = _local(path)
    try:
        with zipfile.ZipFile(local) as archive:
            records = {name.split("/", 1)[1]: name for name in archive.namelist() if "/" in name}
            manifest_record = records.get(f"{MANIFEST_PACKAGE}/{MANIFEST_NAME}")
            if manifest_record is None:
                raise DataError(f"{path}: (package): no {MANIFEST_PACKAGE}/{MANIFEST_NAME}; not a muse package")
            manifest = parse_manifest(archive.read(manifest_record).decode("utf-8"))
            blob_dir = BLOB_PACKAGE.replace(".", "/")
            for name, entry in manifest["blobs"].items():
                record = records.get(f"{blob_dir}/{name}")
                if record is None:
                    raise DataError(f"{path}: blob {name}: missing (truncated or tampered package)")
                size, digest = _stream_digest(archive, record)
                check_digest(name, size, digest, entry)
    except PackageIntegrityError as err:
        raise DataError(f"{path}: {err}") from None
    except (zipfile.BadZipFile, EOFError, OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: (package): not a complete package file, truncated or damaged ({err})") from None
    return manifest


PQ_BLOBS = ("pq.codes", "pq.codebooks")


def attach_pq(importer: PackageImporter, manifest: Dict[str, Any], predictor: Any,
              blobs: Optional[Dict[str, Any]] = None) -> None:
    """Give the predictor's GSU stage the package's PQ codes (``pq.codes``, ``pq.codebooks``), when the model runs
    the approximate GSU (``pq_m``); built with the package's own ``model.gsu.pq.PQIndex``. Blobs already verified;
    ``blobs``: those already decoded (``muse serve`` decodes every blob), else read from the package."""
    if not all(name in manifest["blobs"] for name in PQ_BLOBS):
        return
    if blobs is not None and all(name in blobs for name in PQ_BLOBS):
        codes, codebooks = (blobs[name] for name in PQ_BLOBS)
    else:
        codes, codebooks = (decode_blob(name, importer.load_binary(BLOB_PACKAGE, name), manifest["blobs"][name],
                                        verify=False, writable=name != "pq.codes") for name in PQ_BLOBS)
    index_class = importer.import_module("model.gsu.pq").PQIndex
    predictor.stage.attach_pq(index_class(codes, codebooks, manifest.get("pq") or {}))


def load_predictor(path: str, histories: str | None = None) -> Any:
    """The package's ``Predictor`` (see ``inference.predictor``) after ``verify_package``, serving users by id from
    the history store ``histories`` or, when not given, from ``<path>.histories`` if ``muse export --histories``
    wrote one beside the package."""
    verify_package(path)
    try:
        importer = PackageImporter(_local(path))
        entry = importer.import_module(ENTRY_MODULE)
    except (RuntimeError, ImportError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: (package): cannot be opened as a torch.package ({first})") from None
    predictor = entry.load(importer, verify=False)
    attach_pq(importer, predictor.manifest, predictor)
    if histories is None and os.path.isdir(f"{_local(path)}.histories"):
        histories = f"{_local(path)}.histories"
    if histories is not None:
        if not path_manager.isdir(histories):
            raise UserError(f"--histories {histories}: not a directory (a history store: DATA/<split>/histories)")
        # opened and checked here, so a mismatch is this project's DataError (one line), not the package's own class
        predictor.attach_histories(HistoryStore.open(
            histories, fingerprint=predictor.manifest.get("vocab_fingerprint"),
            num_users=int(predictor.manifest["vocab_sizes"]["user"]), local_path=path_manager.get_local_path))
    return predictor
