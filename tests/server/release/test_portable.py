"""Portable artifacts: adapters name their base, never a path of the writing machine; on another
machine ``--base PATH`` says where the base is, and a base with another fingerprint is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from fedlora.common.config import parse_config
from fedlora.common.model import BaseMismatchError, base_fingerprint, embedded_base_dir


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@pytest.fixture(scope="module")
def moved_base(tmp_path_factory) -> Path:
    """The embedded base copied to another place, as on another machine."""
    return Path(shutil.copytree(embedded_base_dir(), tmp_path_factory.mktemp("elsewhere") / "base"))


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A base that differs from the embedded one in one config value: another fingerprint."""
    root = Path(shutil.copytree(embedded_base_dir(), tmp_path_factory.mktemp("other") / "base"))
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**cfg, "initializer_range": 0.03}, indent=2))
    return root


def test_published_version_names_its_base_and_loads_with_plain_peft(version, moved_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Assert: no JSON file of the version holds an absolute path (they were written on "this machine")
    for path in version.rglob("*.json"):
        absolute = [s for s in _strings(json.loads(path.read_text())) if re.match(r"^/[^/]+/", s)]
        assert not absolute, (path.relative_to(version), absolute)
    adapter_cfg = json.loads((version / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "embedded"
    meta = json.loads((version / "manifest.json").read_text())["metadata"]
    assert meta["base_model"] == "embedded" and meta["base_sha256"] == base_fingerprint(str(moved_base))

    # Execute: the documented load on the moved base, against the merged model
    tok = AutoTokenizer.from_pretrained(moved_base)
    ids = tok("Say hello.", return_tensors="pt")["input_ids"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved_base), str(version / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(version / "merged")
    with torch.no_grad():
        got, want = model(ids).logits, merged(ids).logits
    assert float((got - want).abs().max()) < 1e-4


def test_server_writes_the_portable_name(tmp_path):
    from fedlora.common.base_import import import_base
    from fedlora.server.run import prepare

    base = import_base(embedded_base_dir(), tmp_path / "bases" / "tiny", name="org/tiny-base", say=lambda _: None)
    cfg = parse_config({"model.base": str(base.out_dir), "run.dir": str(tmp_path / "run")})
    run = prepare(cfg)
    written = json.loads((run.run_dir / "checkpoints" / "round_000" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "org/tiny-base"
    meta = json.loads((run.run_dir / "checkpoints" / "round_000" / "fedlora.json").read_text())
    assert meta["base_sha256"] == base.fingerprint


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from fedlora.simulations.cli.main import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_base_override_is_checked_against_the_recorded_fingerprint(version, keys, moved_base, other_base,
                                                                    tmp_path, capsys):
    expected, found = base_fingerprint(str(moved_base)), base_fingerprint(str(other_base))
    pub = str(keys[1])
    for argv in (["merge", str(version), "--public-key", pub, "--out", str(tmp_path / "m"), "--base", str(other_base)],
                 ["dpo", str(version), "--public-key", pub, "--out", str(tmp_path / "d"), "--base", str(other_base)],
                 ["verify", str(version), "--public-key", pub, "--base", str(other_base)]):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2, (argv, err)
        assert f"expected SHA-256 {expected}, found {found}" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m").exists() and not (tmp_path / "d").exists()

    rc, out, err = _cli(capsys, "verify", str(version), "--public-key", pub, "--base", str(moved_base))
    assert rc == 0 and "has the recorded fingerprint" in out, err
    rc, out, err = _cli(capsys, "merge", str(version), "--public-key", pub, "--out", str(tmp_path / "m"),
                        "--base", str(moved_base))
    assert rc == 0, err
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_hotswap_refuses_another_base(version, keys, other_base, moved_base):
    from fedlora.server.release.hotswap import HotSwap

    mcfg = parse_config({}).model
    with pytest.raises(BaseMismatchError, match="expected SHA-256"):
        HotSwap(mcfg, {"v1": version / "adapter"}, public_key=keys[1], base=other_base)
    swap = HotSwap(mcfg, {"v1": version / "adapter"}, public_key=keys[1], base=moved_base)
    assert swap.names == ("v1",)
