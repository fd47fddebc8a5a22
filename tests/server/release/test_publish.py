"""Publishing a real version: layout, model card, signature, tamper detection, plain loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from fedlora.server.release.artifacts import locate
from fedlora.server.release.publish import PublishError, next_version, publish
from fedlora.server.release.manifest import verify_version
from tests.common.make_records import write_round
from tests.server.adapters import write_noisy_adapter


def _copy(version, tmp_path):
    return shutil.copytree(version, tmp_path / "v", symlinks=True)


def test_layout_and_card(version, run_dir):
    # Assert: versioned path, adapter + merged + card + signed manifest
    assert version.parts[-2:] == ("demo", "v1")
    for rel in ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "merged/model.safetensors",
                "merged/config.json", "merged/tokenizer.json", "README.md", "manifest.json", "manifest.sig"]:
        assert (version / rel).is_file(), rel
    card = (version / "README.md").read_text()
    meta = json.loads((run_dir / "adapter" / "fedlora.json").read_text())
    assert meta["base_sha256"] in card
    assert "| federated rounds | 2 |" in card and "| tenants | 3 |" in card
    assert "differential privacy | none" in card


def test_untouched_version_verifies(version, keys):
    result = verify_version(version, keys[1])
    assert result.ok and result.files_checked == len(json.loads((version / "manifest.json").read_text())["files"])


def test_one_changed_byte_fails_naming_the_file(version, keys, tmp_path):
    # Prepare
    v = _copy(version, tmp_path)
    path = v / "merged" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    # Execute
    result = verify_version(v, keys[1])
    # Assert
    assert not result.ok
    assert any(p.startswith("merged/model.safetensors:") and "SHA-256" in p for p in result.problems)


def test_an_added_file_fails_naming_the_file(version, keys, tmp_path):
    v = _copy(version, tmp_path)
    (v / "adapter" / "extra.json").write_text("{}")
    result = verify_version(v, keys[1])
    assert not result.ok
    assert "adapter/extra.json: file is not in the manifest" in result.problems


def test_a_pickle_file_fails_naming_the_file(version, keys, tmp_path):
    v = _copy(version, tmp_path)
    (v / "merged" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    result = verify_version(v, keys[1])
    assert not result.ok
    assert any(p.startswith("merged/pytorch_model.bin: pickle-format file") for p in result.problems)


def test_cli_verify_exit_codes(version, keys, tmp_path):
    # Prepare: one good version and one with an added file
    bad = _copy(version, tmp_path)
    (bad / "note.txt").write_text("x")
    from fedlora.simulations.cli.main import main

    # Execute / Assert
    assert main(["verify", str(version), "--public-key", str(keys[1])]) == 0
    assert main(["verify", str(bad), "--public-key", str(keys[1])]) == 1


def test_versions_are_immutable_and_numbered(version, run_dir, keys):
    registry = version.parent.parent
    assert next_version(registry, "demo") == "v2"
    with pytest.raises(PublishError, match="already exists"):
        publish(locate(run_dir), registry=registry, name="demo", version="v1", signing_key=keys[0])


def test_stale_merge_is_refused(run_dir, keys, tmp_path):
    # Prepare: a run whose final adapter is not the one that was merged
    stale = shutil.copytree(run_dir, tmp_path / "run")
    write_noisy_adapter(stale / "dpo" / "adapter", locate(stale).cfg, seed=9)
    # Execute / Assert
    with pytest.raises(PublishError, match="merged from another adapter"):
        publish(locate(stale), registry=tmp_path / "reg", name="demo", signing_key=keys[0])


@pytest.mark.slow
def test_published_artifacts_load_with_plain_libraries_in_a_fresh_process(version):
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from peft import PeftModel\n"
        "from fedlora.common.model import embedded_base_dir\n"
        "v = sys.argv[1]\n"
        "tok = AutoTokenizer.from_pretrained(v + '/merged')\n"
        "peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(embedded_base_dir())), v + '/adapter')\n"
        "merged = AutoModelForCausalLM.from_pretrained(v + '/merged')\n"
        "ids = tok('### Instruction:\\nSay hello.\\n\\n### Response:\\n', return_tensors='pt').input_ids\n"
        "with torch.no_grad():\n"
        "    print(type(peft).__name__, type(merged).__name__, float((peft(ids).logits - merged(ids).logits).abs().max()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(version)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peft_name, merged_name, diff = out.stdout.split()
    assert (peft_name, merged_name) == ("PeftModelForCausalLM", "LlamaForCausalLM")
    assert float(diff) <= 1e-4


def test_cli_publish_then_refuse_to_merge_into_a_version(run_dir, keys, tmp_path, capsys):
    from fedlora.simulations.cli.main import main

    # Execute
    code = main(["publish", str(run_dir), "--registry", str(tmp_path / "reg"), "--signing-key", str(keys[0])])
    refused = main(["merge", str(tmp_path / "reg" / "fedlora-model" / "v1"), "--public-key", str(keys[1])])
    # Assert
    assert code == 0 and (tmp_path / "reg" / "fedlora-model" / "v1" / "manifest.sig").is_file()
    assert refused == 2
    assert "published version and must not change" in capsys.readouterr().err


def test_card_states_epsilon_from_the_round_records(run_dir, keys, tmp_path):
    # Prepare: a run whose last round recorded central and local DP spend
    dp_run = shutil.copytree(run_dir, tmp_path / "run")
    write_round(dp_run, 2, privacy={"epsilon": 1.234}, train={"0": {"dp-epsilon": 2.5}})
    # Execute
    published = publish(locate(dp_run), registry=tmp_path / "reg", name="demo", signing_key=keys[0])
    # Assert
    card = (published.path / "README.md").read_text()
    assert "central = 1.23 (the server's accountant)" in card
    assert "tenant 0 = 2.5 (reported by the tenant; the server cannot check it)" in card


def test_the_merged_model_is_stored_once_per_run(version, run_dir):
    # Assert: the registry's merged weights are the run's file (a hard link), not a second copy
    import os

    published, merged = version / "merged" / "model.safetensors", run_dir / "merged" / "model.safetensors"
    assert os.stat(published).st_ino == os.stat(merged).st_ino


def test_merging_the_run_again_leaves_the_published_version_intact(run_dir, keys, tmp_path):
    # Prepare: a copy of the run, published (its merged weights linked into the registry)
    from fedlora.server.release.stages import ReleaseInputs, run_merge

    run = shutil.copytree(run_dir, tmp_path / "run", symlinks=True)
    result = publish(locate(run), registry=tmp_path / "registry", name="demo", signing_key=keys[0])
    # Execute: a new merge of the run replaces its merged/ directory
    run_merge(locate(run), ReleaseInputs(merge_prompts=("Say hi.",)))
    # Assert: the version's bytes are the signed ones still
    assert verify_version(result.path, keys[1]).ok
