"""Manifest, signature and verification for published model versions.

A published version is a directory. Its trust core is two files at its top:

* ``manifest.json`` lists every other regular file (relative POSIX path,
  SHA-256, size) plus free-form metadata, serialised deterministically;
* ``manifest.sig`` is a detached Ed25519 signature over the exact bytes of
  ``manifest.json``, as one line of base64.

Verification checks the signature, re-hashes every listed file and reports
every deviation (changed, missing or extra files, symlinks, pickle-format
files, unsafe paths) instead of stopping at the first one. Pickle-format files
are refused outright: fedlora only loads safetensors.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature

from fedlora.common.credentials import load_private_key, load_public_key
from fedlora.common.files import file_digest, pickle_suffix, write_atomic

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MANIFEST_FORMAT = "fedlora-manifest/1"

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_RESERVED = frozenset({MANIFEST_NAME, SIGNATURE_NAME})


class ManifestError(ValueError):
    """A version directory cannot be listed in a manifest (symlink, pickle, ...)."""


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_version`.

    Attributes:
        ok: True only if the signature is valid and the tree matches the
            manifest exactly.
        problems: one human-readable line per problem, each starting with the
            file it concerns.
        files_checked: number of manifest entries whose content was re-hashed.
    """

    ok: bool
    problems: tuple[str, ...]
    files_checked: int


@dataclass(frozen=True)
class _Scan:
    """Regular files found under a version directory, and what was refused."""

    files: tuple[str, ...]
    problems: tuple[str, ...]


# --------------------------------------------------------------------------- #
# Tree walking and hashing
# --------------------------------------------------------------------------- #
def _pickle_problem(rel: str, suffix: str) -> str:
    return f"{rel}: pickle-format file ({suffix}) refused; fedlora only loads safetensors"


def _scan_tree(root: Path) -> _Scan:
    """List regular files under ``root`` (sorted, relative POSIX paths).

    Symlinks (to files or directories) are reported and never followed;
    special files (sockets, FIFOs, devices) are reported; pickle-format files
    are reported *and* listed, so callers can also compare them with a
    manifest. The top-level ``manifest.json``/``manifest.sig`` are skipped.
    """
    files: list[str] = []
    problems: list[str] = []
    pending: list[tuple[Path, PurePosixPath]] = [(root, PurePosixPath())]
    while pending:
        directory, rel_dir = pending.pop()
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = rel_dir / entry.name
                rel_str = rel.as_posix()
                if not rel_dir.parts and entry.name in _RESERVED:
                    continue
                if entry.is_symlink():
                    problems.append(
                        f"{rel_str}: symbolic link refused; copy the real file into "
                        "the version directory instead"
                    )
                elif entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), rel))
                elif entry.is_file(follow_symlinks=False):
                    files.append(rel_str)
                    suffix = pickle_suffix(rel_str)
                    if suffix:
                        problems.append(_pickle_problem(rel_str, suffix))
                else:
                    problems.append(f"{rel_str}: not a regular file (socket, FIFO or device)")
    return _Scan(files=tuple(sorted(files)), problems=tuple(problems))


def _manifest_bytes(document: dict[str, Any]) -> bytes:
    """Serialise a manifest deterministically."""
    return (json.dumps(document, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def _require_dir(version_dir: Path | str) -> Path:
    directory = Path(version_dir)
    if not directory.is_dir() or directory.is_symlink():
        raise NotADirectoryError(
            f"{directory}: not a version directory (missing, a file, or a symlink)."
        )
    return directory


# --------------------------------------------------------------------------- #
# Writing and signing
# --------------------------------------------------------------------------- #
def write_manifest(version_dir: Path | str, *, metadata: dict[str, Any]) -> Path:
    """Write ``manifest.json`` listing every regular file under ``version_dir``.

    Files are hashed in 1 MiB chunks. A stale ``manifest.sig`` is removed,
    because it cannot match the new manifest; sign again with
    :func:`sign_manifest`.

    Raises:
        ManifestError: listing every symlink, special file and pickle-format
            file found (nothing is written in that case).
        ValueError: if ``metadata`` is not JSON-serialisable.
        NotADirectoryError: if ``version_dir`` is not a directory.
    """
    directory = _require_dir(version_dir)
    scan = _scan_tree(directory)
    if scan.problems:
        raise ManifestError(
            f"Cannot write {directory / MANIFEST_NAME}; remove or replace these files:\n  "
            + "\n  ".join(scan.problems)
        )
    entries: dict[str, dict[str, Any]] = {}
    for rel in scan.files:
        sha256, size = file_digest(directory / rel)
        entries[rel] = {"sha256": sha256, "size": size}
    document = {"format": MANIFEST_FORMAT, "metadata": metadata, "files": entries}
    try:
        data = _manifest_bytes(document)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"metadata for {directory / MANIFEST_NAME} is not JSON-serialisable "
            f"(use str/int/float/bool/None/lists/dicts, no NaN): {err}"
        ) from err

    target = write_atomic(directory / MANIFEST_NAME, data)
    (directory / SIGNATURE_NAME).unlink(missing_ok=True)
    return target


def sign_manifest(version_dir: Path | str, private_key_path: Path | str) -> Path:
    """Write ``manifest.sig``: an Ed25519 signature over the bytes of ``manifest.json``.

    The signature is stored as one line of standard base64.

    Raises:
        FileNotFoundError: if ``manifest.json`` or the key file is missing.
        ValueError: if ``manifest.json`` is not a fedlora manifest or the key
            is not an Ed25519 private key.
    """
    directory = _require_dir(version_dir)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} does not exist; run write_manifest before signing."
        )
    data = manifest_path.read_bytes()
    _parse_manifest(data)  # refuse to sign something that is not a manifest
    key = load_private_key(private_key_path)
    signature = base64.b64encode(key.sign(data)).decode("ascii")
    sig_path = directory / SIGNATURE_NAME
    sig_path.unlink(missing_ok=True)  # never write through a planted symlink
    sig_path.write_text(signature + "\n", encoding="ascii")
    return sig_path


# --------------------------------------------------------------------------- #
# Verification
# --------------------------------------------------------------------------- #
def _parse_manifest(data: bytes) -> dict[str, Any]:
    """Parse manifest bytes, raising ``ValueError`` with a readable reason."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{MANIFEST_NAME}: not valid JSON ({err})") from err
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{MANIFEST_NAME}: not a {MANIFEST_FORMAT} manifest")
    if not isinstance(document.get("files"), dict):
        raise ValueError(f"{MANIFEST_NAME}: 'files' must be an object")
    return document


def _unsafe_path_reason(rel: str) -> str | None:
    """Why a manifest key must not be used as a path, or None if it is safe."""
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        return "absolute, empty or non-POSIX path"
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "path contains '..', '.' or empty components"
    if re.match(r"^[A-Za-z]:", rel):
        return "absolute (drive-letter) path"
    if len(parts) == 1 and rel in _RESERVED:
        return "reserved name"
    return None


def _check_signature(directory: Path, manifest_data: bytes, public_key_path: Path | str) -> list[str]:
    sig_path = directory / SIGNATURE_NAME
    if not sig_path.is_file() or sig_path.is_symlink():
        return [f"{SIGNATURE_NAME}: missing; the version was never signed (run sign_manifest)"]
    public_key = load_public_key(public_key_path)
    try:
        signature = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
    except (binascii.Error, ValueError):
        return [f"{SIGNATURE_NAME}: not valid base64; re-sign the version"]
    try:
        public_key.verify(signature, manifest_data)
    except InvalidSignature:
        return [
            f"{SIGNATURE_NAME}: signature does not match {MANIFEST_NAME} "
            "(signed by another key or manifest changed)"
        ]
    return []


def _through_symlink(directory: Path, rel: str) -> bool:
    """True if ``rel`` or any of its parent directories is a symlink."""
    current = directory
    for part in rel.split("/"):
        current = current / part
        if current.is_symlink():
            return True
    return False


def _check_entry(directory: Path, rel: str, entry: Any) -> tuple[list[str], bool]:
    """Compare one manifest entry with the file on disk; returns (problems, hashed)."""
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("sha256"), str)
        or not _SHA256_HEX.match(entry["sha256"])
        or not isinstance(entry.get("size"), int)
        or isinstance(entry.get("size"), bool)
    ):
        return [f"{rel}: malformed manifest entry (needs 'sha256' hex and integer 'size')"], False
    path = directory / rel
    if _through_symlink(directory, rel):
        return [], False  # already reported by the tree scan; never follow it
    if not path.exists():
        return [f"{rel}: listed in the manifest but missing"], False
    if not path.is_file():
        return [f"{rel}: listed in the manifest but not a regular file"], False
    sha256, size = file_digest(path)
    if size != entry["size"]:
        return [
            f"{rel}: size mismatch (manifest {entry['size']} bytes, found {size}; "
            "file changed after signing)"
        ], True
    if sha256 != entry["sha256"]:
        return [f"{rel}: SHA-256 mismatch (file changed after signing)"], True
    return [], True


def _place_problems(directory: Path, metadata: dict) -> list[str]:
    """A version is bound to its place: ``<registry>/<name>/<version>`` must be the name and
    version it was signed as (a signed v1 copied in as v2 is refused)."""
    directory = directory.resolve()
    name, version = metadata.get("name"), metadata.get("version")
    if version is not None and directory.name != version or name is not None and directory.parent.name != name:
        return [f"{MANIFEST_NAME}: signed as {name} {version}, but it lies at {directory.parent.name}/{directory.name}; "
                "a version is not renamed or copied under another name or version"]
    return []


def verify_version(version_dir: Path | str, public_key_path: Path | str) -> VerifyResult:
    """Verify a signed version directory against ``public_key_path``.

    Collects every problem: bad or missing signature, malformed manifest,
    unsafe manifest paths, changed/missing/extra files, symlinks and
    pickle-format files anywhere in the tree.

    Raises:
        FileNotFoundError / ValueError: only for an unusable *public key* file
            (an operator error, not a property of the version).
        NotADirectoryError: if ``version_dir`` is not a directory.
    """
    directory = _require_dir(version_dir)
    load_public_key(public_key_path)  # fail early on a wrong key file
    problems: list[str] = []
    files_checked = 0

    manifest_path = directory / MANIFEST_NAME
    document: dict[str, Any] | None = None
    if not manifest_path.is_file() or manifest_path.is_symlink():
        problems.append(
            f"{MANIFEST_NAME}: missing or not a regular file; the version has no "
            "usable manifest (publish it again)"
        )
        if not (directory / SIGNATURE_NAME).is_file():
            problems.append(f"{SIGNATURE_NAME}: missing; the version was never signed")
    else:
        manifest_data = manifest_path.read_bytes()
        problems.extend(_check_signature(directory, manifest_data, public_key_path))
        try:
            document = _parse_manifest(manifest_data)
        except ValueError as err:
            problems.append(str(err))

    if document is not None:
        problems.extend(_place_problems(directory, document.get("metadata") or {}))
    scan = _scan_tree(directory)
    problems.extend(scan.problems)
    listed: set[str] = set()
    if document is not None:
        for rel, entry in sorted(document["files"].items()):
            reason = _unsafe_path_reason(rel)
            if reason:
                problems.append(f"{rel}: unsafe path in manifest ({reason}); not read")
                continue
            listed.add(rel)
            entry_problems, hashed = _check_entry(directory, rel, entry)
            problems.extend(entry_problems)
            files_checked += int(hashed)
    problems.extend(
        f"{rel}: file is not in the manifest" for rel in scan.files if rel not in listed
    )
    return VerifyResult(ok=not problems, problems=tuple(problems), files_checked=files_checked)


def read_metadata(version_dir: Path | str) -> dict[str, Any]:
    """The ``metadata`` of a version's manifest (name, version, base name and fingerprint).

    Read it only after :func:`verify_version` succeeded; unverified, it is just a claim.
    """
    document = _parse_manifest((_require_dir(version_dir) / MANIFEST_NAME).read_bytes())
    metadata = document.get("metadata")
    return metadata if isinstance(metadata, dict) else {}
