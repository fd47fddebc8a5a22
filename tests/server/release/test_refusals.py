"""What the release stages refuse: a failed federation's adapter, an unverified or tampered
published version, a malformed weights file; and the CLI says so in one line, exit code 2."""

from __future__ import annotations

import json
import shutil

import pytest

from fedlora.common.adapter import METADATA_FILE
from fedlora.common.credentials import write_signing_keypair
from fedlora.server.release.artifacts import SourceError, locate


def _failed_copy(run_dir, tmp_path):
    """The run as the ServerApp leaves a failed federation: failure in the adapter's metadata."""
    failed = shutil.copytree(run_dir, tmp_path / "failed")
    meta = failed / "adapter" / METADATA_FILE
    reason = "only 0 of 2 round(s) aggregated an update; federation.min-successful-rounds is 1"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "failure": reason, "aggregated_rounds": 0}))
    return failed, reason


def test_merge_of_a_failed_federation_is_refused_by_the_cli(run_dir, tmp_path, capsys):
    from fedlora.simulations.cli.main import main

    # Prepare
    failed, reason = _failed_copy(run_dir, tmp_path)
    # Execute
    code = main(["merge", str(failed), "--out", str(tmp_path / "merged")])
    # Assert: one line naming the failure, exit 2, nothing merged
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and reason in err[0] and "failed federation" in err[0]
    assert not (tmp_path / "merged").exists()


def test_publish_and_dpo_refuse_a_failed_federation_too(run_dir, keys, tmp_path):
    from fedlora.server.release.publish import publish

    # Prepare: the marker alone (no failure in the metadata) is enough
    failed = shutil.copytree(run_dir, tmp_path / "marked")
    (failed / "FEDERATION_FAILED").write_text(json.dumps({"adapter": "adapter", "failure": "too few rounds"}))
    # Execute / Assert
    with pytest.raises(SourceError, match="too few rounds"):
        locate(failed)
    source = locate(run_dir)
    meta = {**source.metadata, "failure": "too few rounds"}
    with pytest.raises(SourceError, match="failed federation"):
        publish(type(source)(kind="run", root=run_dir, cfg=source.cfg, metadata=meta), registry=tmp_path / "r",
                name="x", signing_key=keys[0])


def test_a_version_is_merged_only_after_its_signature_verifies(version, keys, tmp_path, capsys):
    from fedlora.simulations.cli.main import main

    # Prepare: a second key pair that did not sign the version, and a tampered copy
    other = write_signing_keypair(tmp_path / "other")
    tampered = shutil.copytree(version, tmp_path / "tampered")
    (tampered / "README.md").write_text("changed after signing\n")
    # Execute
    without = main(["merge", str(version), "--out", str(tmp_path / "a")])
    wrong_key = main(["merge", str(version), "--out", str(tmp_path / "b"), "--public-key", str(other[1])])
    changed = main(["merge", str(tampered), "--out", str(tmp_path / "c"), "--public-key", str(keys[1])])
    err = capsys.readouterr().err
    # Assert: each refused in one line, nothing written
    assert (without, wrong_key, changed) == (2, 2, 2)
    assert "pass --public-key" in err
    assert "signature does not match" in err
    assert "README.md: SHA-256 mismatch" in err or "README.md: size mismatch" in err
    assert not any((tmp_path / d).exists() for d in "abc")
    assert locate(version, public_key=keys[1]).verified is True


def test_hotswap_refuses_an_unverified_version(version, keys):
    from fedlora.server.release.hotswap import check_adapter

    # Execute / Assert: without a key refused, with the publisher's key accepted
    with pytest.raises(SourceError, match="verifying its signature"):
        check_adapter(version / "adapter", public_key=None)
    check_adapter(version / "adapter", public_key=keys[1])


def test_merge_of_a_malformed_safetensors_file_says_so_in_one_line(run_dir, tmp_path, capsys):
    from fedlora.simulations.cli.main import main

    # Prepare: the adapter's weights file cut short
    broken = shutil.copytree(run_dir, tmp_path / "broken")
    weights = broken / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    # Execute
    code = main(["merge", str(broken), "--out", str(tmp_path / "merged")])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "adapter_model.safetensors: not a readable safetensors file" in err[0]
    assert "Traceback" not in err[0]


def test_verify_with_a_missing_directory_or_a_wrong_key_file_says_so_in_one_line(version, keys, tmp_path, capsys):
    from fedlora.simulations.cli.main import main

    # Prepare: a "key" that is not a PEM key
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("not a key\n")
    # Execute
    missing = main(["verify", str(tmp_path / "nope"), "--public-key", str(keys[1])])
    missing_err = capsys.readouterr().err.strip().splitlines()
    wrong = main(["verify", str(version), "--public-key", str(bad_key)])
    wrong_err = capsys.readouterr().err.strip().splitlines()
    no_key = main(["verify", str(version), "--public-key", str(tmp_path / "absent.pub")])
    no_key_err = capsys.readouterr().err.strip().splitlines()
    # Assert
    assert (missing, wrong, no_key) == (2, 2, 2)
    assert len(missing_err) == 1 and "not a version directory" in missing_err[0]
    assert len(wrong_err) == 1 and "not a PEM public key" in wrong_err[0]
    assert len(no_key_err) == 1 and "does not exist" in no_key_err[0]


def test_debug_shows_the_traceback(tmp_path):
    from fedlora.simulations.cli.main import main

    # Execute / Assert: --debug re-raises the error the plain command prints in one line
    with pytest.raises(NotADirectoryError):
        main(["--debug", "verify", str(tmp_path / "nope"), "--public-key", str(tmp_path / "k.pub")])


def _as_run(version, tmp_path):
    """The manifest-removed tamper: a version's files, its manifest gone, a config.json added."""
    from fedlora.server.release.artifacts import VERSION_CONFIG

    fake = shutil.copytree(version, tmp_path / "reg" / version.parent.name / version.name)
    (fake / "manifest.json").unlink()
    (fake / "config.json").write_text((fake / VERSION_CONFIG).read_text())
    return fake


def _copied_as_v2(version, tmp_path):
    """The copied-version tamper: a signed v1 copied in as v2 of the same model."""
    return shutil.copytree(version, tmp_path / "reg2" / version.parent.name / "v2")


@pytest.mark.parametrize("tamper, says", [(_as_run, "manifest.json: missing"), (_copied_as_v2, "signed as")])
def test_every_loader_refuses_a_tampered_version_when_a_key_is_given(version, keys, tmp_path, capsys, tamper, says):
    from fedlora.server.release.hotswap import check_adapter
    from fedlora.simulations.cli.main import main

    # Prepare
    bad = tamper(version, tmp_path)
    # Execute / Assert: the library loaders...
    with pytest.raises(SourceError, match=says):
        locate(bad, public_key=keys[1])
    with pytest.raises(SourceError, match=says):
        check_adapter(bad / "adapter", public_key=keys[1])
    # ... and each command, in one line, exit 2, nothing written
    for cmd in (["merge", str(bad), "--out", str(tmp_path / "m")], ["dpo", str(bad), "--out", str(tmp_path / "d")]):
        code = main([*cmd, "--public-key", str(keys[1])])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and says in err[0], (cmd, err)
    assert main(["verify", str(bad), "--public-key", str(keys[1])]) == 1
    assert not (tmp_path / "m").exists() and not (tmp_path / "d").exists()


def test_the_loaders_read_the_bytes_that_verified(version, keys, monkeypatch):
    import fedlora.server.release.snapshot as snapshot

    # Prepare: weights swapped on disk right after the check (a writer racing the loader)
    weights = version / "adapter" / "adapter_model.safetensors"
    signed = weights.read_bytes()
    real = snapshot.verify_version

    def swap_after_check(root, key):
        result = real(root, key)
        weights.write_bytes(signed[:-8] + b"\0" * 8)
        return result

    monkeypatch.setattr(snapshot, "verify_version", swap_after_check)
    try:
        # Execute / Assert: the copy is hashed against the signed manifest, so the swap is refused
        with pytest.raises(SourceError, match="changed after it was verified"):
            locate(version, public_key=keys[1])
    finally:
        weights.write_bytes(signed)
    # and an honest load reads a private copy, which later writes to the registry do not reach
    monkeypatch.setattr(snapshot, "verify_version", real)
    source = locate(version, public_key=keys[1])
    assert source.aggregate_dir != version / "adapter"
    assert (source.aggregate_dir / "adapter_model.safetensors").read_bytes() == signed
