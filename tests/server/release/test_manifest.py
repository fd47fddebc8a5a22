"""Tests for fedlora.server.release.manifest: manifest writing, signing and verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.common.credentials import write_signing_keypair
from fedlora.server.release.manifest import (
    ManifestError,
    sign_manifest,
    verify_version,
    write_manifest,
)

ADAPTER = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The publisher's (private, public) Ed25519 key pair."""
    return write_signing_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture()
def version_dir(tmp_path: Path) -> Path:
    """An unsigned version directory with a nested adapter and a README."""
    root = tmp_path / "v1"
    (root / "adapter").mkdir(parents=True)
    (root / ADAPTER).write_bytes(bytes(range(256)) * 4)
    (root / "adapter" / "adapter_config.json").write_text('{"r": 8}\n')
    (root / "README.md").write_text("# v1\n")
    return root


@pytest.fixture()
def signed_dir(version_dir: Path, keys: tuple[Path, Path]) -> Path:
    """``version_dir`` with manifest.json and manifest.sig written."""
    write_manifest(version_dir, metadata={"round": 3, "base_model": "tiny"})
    sign_manifest(version_dir, keys[0])
    return version_dir


def _problems_for(result, name: str) -> list[str]:
    return [problem for problem in result.problems if problem.startswith(f"{name}:")]


# --------------------------------------------------------------------------- #
# write_manifest
# --------------------------------------------------------------------------- #
def test_manifest_lists_every_file_with_hash_and_size(version_dir: Path) -> None:
    # Execute
    manifest = json.loads(write_manifest(version_dir, metadata={"round": 1}).read_text())

    # Assert
    assert manifest["format"] == "fedlora-manifest/1"
    assert manifest["metadata"] == {"round": 1}
    assert sorted(manifest["files"]) == ["README.md", "adapter/adapter_config.json", ADAPTER]
    assert manifest["files"][ADAPTER]["size"] == 1024
    assert len(manifest["files"][ADAPTER]["sha256"]) == 64


def test_manifest_bytes_are_deterministic(version_dir: Path) -> None:
    # Prepare
    first = write_manifest(version_dir, metadata={"b": 1, "a": 2}).read_bytes()

    # Execute
    second = write_manifest(version_dir, metadata={"a": 2, "b": 1}).read_bytes()

    # Assert
    assert first == second


def test_write_manifest_refuses_pickle_files_naming_them(version_dir: Path) -> None:
    # Prepare
    (version_dir / "adapter" / "model.pt").write_bytes(b"\x80\x04pickle")

    # Execute / Assert
    with pytest.raises(ManifestError, match=r"adapter/model\.pt: pickle-format file"):
        write_manifest(version_dir, metadata={})
    assert not (version_dir / "manifest.json").exists()


def test_write_manifest_refuses_symlinks_naming_them(version_dir: Path) -> None:
    # Prepare
    (version_dir / "link.safetensors").symlink_to(version_dir / ADAPTER)

    # Execute / Assert
    with pytest.raises(ManifestError, match=r"link\.safetensors: symbolic link"):
        write_manifest(version_dir, metadata={})


# --------------------------------------------------------------------------- #
# verify_version
# --------------------------------------------------------------------------- #
def test_untouched_signed_version_verifies(signed_dir: Path, keys: tuple[Path, Path]) -> None:
    # Execute
    result = verify_version(signed_dir, keys[1])

    # Assert
    assert result.ok, result.problems
    assert result.problems == ()
    assert result.files_checked == 3


def test_one_changed_byte_fails_naming_the_file(signed_dir: Path, keys: tuple[Path, Path]) -> None:
    # Prepare
    data = bytearray((signed_dir / ADAPTER).read_bytes())
    data[500] ^= 0x01
    (signed_dir / ADAPTER).write_bytes(bytes(data))

    # Execute
    result = verify_version(signed_dir, keys[1])

    # Assert
    assert not result.ok
    assert result.problems == (f"{ADAPTER}: SHA-256 mismatch (file changed after signing)",)


def test_added_file_fails_naming_it(signed_dir: Path, keys: tuple[Path, Path]) -> None:
    # Prepare
    (signed_dir / "extra.txt").write_text("sneaked in\n")

    # Execute
    result = verify_version(signed_dir, keys[1])

    # Assert
    assert not result.ok
    assert result.problems == ("extra.txt: file is not in the manifest",)


def test_pickle_file_fails_naming_it(signed_dir: Path, keys: tuple[Path, Path]) -> None:
    # Prepare
    (signed_dir / "model.bin").write_bytes(b"\x80\x04pickle")

    # Execute
    result = verify_version(signed_dir, keys[1])

    # Assert
    assert not result.ok
    assert (
        "model.bin: pickle-format file (.bin) refused; fedlora only loads safetensors"
        in result.problems
    )


def test_manifest_edited_after_signing_fails_on_signature(
    signed_dir: Path, keys: tuple[Path, Path]
) -> None:
    # Prepare
    manifest_path = signed_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["metadata"]["round"] = 4
    manifest_path.write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")

    # Execute
    result = verify_version(signed_dir, keys[1])

    # Assert
    assert not result.ok
    assert result.problems == (
        "manifest.sig: signature does not match manifest.json "
        "(signed by another key or manifest changed)",
    )


def test_other_public_key_fails_on_signature(signed_dir: Path, tmp_path: Path) -> None:
    # Prepare
    _, other_public = write_signing_keypair(tmp_path / "other")

    # Execute
    result = verify_version(signed_dir, other_public)

    # Assert
    assert not result.ok
    assert [p.split(":")[0] for p in result.problems] == ["manifest.sig"]


def test_missing_file_fails_naming_it(signed_dir: Path, keys: tuple[Path, Path]) -> None:
    # Prepare
    (signed_dir / "README.md").unlink()

    # Execute
    result = verify_version(signed_dir, keys[1])

    # Assert
    assert not result.ok
    assert result.problems == ("README.md: listed in the manifest but missing",)


def test_missing_signature_fails_naming_it(signed_dir: Path, keys: tuple[Path, Path]) -> None:
    # Prepare
    (signed_dir / "manifest.sig").unlink()

    # Execute
    result = verify_version(signed_dir, keys[1])

    # Assert
    assert not result.ok
    assert len(_problems_for(result, "manifest.sig")) == 1


def test_path_traversal_in_manifest_is_a_problem_even_when_signed(
    version_dir: Path, keys: tuple[Path, Path]
) -> None:
    # Prepare: a validly signed manifest whose keys point outside the version
    (version_dir.parent / "outside.txt").write_text("secret\n")
    manifest_path = write_manifest(version_dir, metadata={})
    manifest = json.loads(manifest_path.read_text())
    entry = {"sha256": "0" * 64, "size": 7}
    manifest["files"].update({"../outside.txt": entry, "/etc/hostname": entry})
    manifest_path.write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    sign_manifest(version_dir, keys[0])

    # Execute
    result = verify_version(version_dir, keys[1])

    # Assert
    assert not result.ok
    assert len(_problems_for(result, "../outside.txt")) == 1
    assert len(_problems_for(result, "/etc/hostname")) == 1
    assert result.files_checked == 3


def test_all_problems_are_collected(signed_dir: Path, keys: tuple[Path, Path]) -> None:
    # Prepare
    (signed_dir / "README.md").unlink()
    (signed_dir / "extra.txt").write_text("x\n")
    (signed_dir / "adapter" / "adapter_config.json").write_text('{"r": 9}\n')

    # Execute
    result = verify_version(signed_dir, keys[1])

    # Assert
    assert sorted(p.split(":")[0] for p in result.problems) == [
        "README.md",
        "adapter/adapter_config.json",
        "extra.txt",
    ]
