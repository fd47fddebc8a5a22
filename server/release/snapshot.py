"""Loading a published version reads the bytes that were verified, not the files again.

Verifying a directory and then loading from it reads every file twice: whoever can write
there between the two reads swaps the weights after the check. :func:`verified_snapshot`
verifies the whole version (:func:`fedlora.server.release.manifest.verify_version`), then
copies the parts a loader needs (the adapter and the small JSON files, not the merged
model) into a private directory, hashing each copy against the signed manifest it read
once and checked the signature of. Loaders read the copy; a file changed between the two
steps is refused.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from pathlib import Path

from fedlora.server.release.manifest import MANIFEST_NAME, _check_signature, _parse_manifest, verify_version

# what a loader of a version reads (its merged model is never loaded from the registry)
LOADED_PARTS = ("adapter/",)


class SnapshotError(ValueError):
    """A version that did not verify, or that changed while it was being read."""


def verified_snapshot(version_dir: str | Path, public_key: str | Path, *, parts: tuple[str, ...] = LOADED_PARTS
                      ) -> Path:
    """A private copy of ``version_dir``'s files under ``parts`` (and its top-level JSON), each
    checked against the signed manifest; removed when the process ends. Raises SnapshotError."""
    root = Path(version_dir)
    result = verify_version(root, public_key)
    if not result.ok:
        raise SnapshotError(f"{root}: signature verification failed, refusing to use it: " + "; ".join(result.problems))
    manifest = (root / MANIFEST_NAME).read_bytes()  # read once: its signature and every copy are checked on these
    if _check_signature(root, manifest, public_key):
        raise SnapshotError(f"{root}: {MANIFEST_NAME} changed while it was being verified; refusing to use it")
    files = _parse_manifest(manifest)["files"]
    dest = Path(tempfile.mkdtemp(prefix="fedlora-verified-"))
    atexit.register(shutil.rmtree, dest, True)
    for rel, entry in sorted(files.items()):
        if not (rel.startswith(parts) or ("/" not in rel and rel.endswith(".json"))):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with (root / rel).open("rb") as src, target.open("wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise SnapshotError(f"{root / rel}: changed after it was verified (SHA-256 differs from the signed "
                                "manifest); refusing to use it")
    (dest / MANIFEST_NAME).write_bytes(manifest)
    return dest
