"""``fedlora import-base``: a GGUF written from the embedded base imports back to the same model,
loads through fedlora's loader, and every operator error is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.common.config import AdapterConfig, ModelConfig
from fedlora.common.files import file_digest
from fedlora.common.model import BASE_RECORD, base_fingerprint, base_name, embedded_base_dir, load_model

import gguf  # noqa: E402  (a dependency: GGUF bases are imported with it)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections (what transformers' GGUF loader undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, path: Path, *, arch: str = "llama") -> Path:
    """An F32 GGUF of a small Llama with a byte-level BPE tokenizer, as llama.cpp's converter lays it out."""
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(cfg["vocab_size"]))
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i < 4 else 1 for i in range(len(vocab))])  # the four specials are CONTROL
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for hf_name, tensor in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None or hf_name == "lm_head.weight":  # tied to the embeddings: not stored
            continue
        if ".attn_q" in name or ".attn_k" in name:
            tensor = _permute(tensor, heads)
        w.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(tensor, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_gguf(embedded_base_dir(), tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


@pytest.fixture(scope="module")
def imported(tiny_gguf, tmp_path_factory):
    from fedlora.common.base_import import import_base

    out = tmp_path_factory.mktemp("bases") / "tiny"
    return import_base(tiny_gguf, out, say=lambda _: None, force=True)


def test_gguf_import_is_the_same_model_and_records_its_hashes(imported, tiny_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = imported.out_dir
    record = json.loads((out / BASE_RECORD).read_text())
    assert record["name"] == "tiny-llama"  # the file's stem without the ".F32" quantization suffix
    assert record["source"] == "tiny-llama.F32.gguf" and record["source_kind"] == "gguf"
    assert record["source_sha256"] == file_digest(tiny_gguf)[0]
    assert record["fingerprint"] == base_fingerprint(str(out))
    assert record["dtype"] == "fp32" and record["parameters"] == imported.parameters
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()}
    assert base_name(str(out)) == "tiny-llama"

    # F32 in the GGUF: dequantization is exact, so the logits equal the embedded base's.
    ref_dir = embedded_base_dir()
    ids = AutoTokenizer.from_pretrained(ref_dir)("Answer: the capital of France", return_tensors="pt")["input_ids"]
    assert AutoTokenizer.from_pretrained(out)("Answer: the capital of France")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert torch.allclose(ref, got, atol=1e-5), float((ref - got).abs().max())


def test_imported_base_loads_through_fedlora(imported):
    loaded = load_model(ModelConfig(base=str(imported.out_dir), device="cpu"), AdapterConfig(r=4), for_training=False)
    assert loaded.model.peft_config["default"].r == 4
    assert loaded.tokenizer.pad_token is not None


def test_bf16_import_and_hf_directory_route(tmp_path):
    from fedlora.common.base_import import import_base

    got = import_base(embedded_base_dir(), tmp_path / "bf16", name="org/tiny", dtype="bf16", say=lambda _: None)
    record = json.loads((tmp_path / "bf16" / BASE_RECORD).read_text())
    assert record["source_kind"] == "hf" and record["source_sha256"] == base_fingerprint("embedded")
    assert record["dtype"] == "bf16" and got.name == "org/tiny" == base_name(str(tmp_path / "bf16"))
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from fedlora.simulations.cli.main import main

    rc = main(["import-base", *argv])
    return rc, capsys.readouterr().err


def test_refusals_are_one_line_exit_2(tmp_path, capsys, tiny_gguf):
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    other_arch = write_gguf(embedded_base_dir(), tmp_path / "odd.gguf", arch="no-such-arch")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    cases = {
        (str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "a")): "no such file or directory",
        (str(not_gguf), "--out", str(tmp_path / "b")): "not a GGUF file",
        (str(other_arch), "--out", str(tmp_path / "c")): "architecture 'no-such-arch' cannot be dequantized",
        (str(tiny_gguf), "--out", str(busy)): "exists and is not empty",
        (str(tiny_gguf), "--out", str(tmp_path / "d"), "--name", "/abs/path"): "not a portable base name",
    }
    for argv, expected in cases.items():
        rc, err = _cli(capsys, *argv)
        assert rc == 2, (argv, err)
        assert expected in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert (busy / "keep.txt").is_file() and not (tmp_path / "b").exists()


def test_import_without_out_lands_in_the_bases_dir_and_the_name_resolves(tiny_gguf, tmp_path, monkeypatch, capsys):
    # Prepare: an empty bases directory
    from fedlora.common.model import BASES_ENV, resolve_base
    from fedlora.simulations.cli.main import main

    monkeypatch.setenv(BASES_ENV, str(tmp_path / "bases"))
    # Execute: no --out
    code = main(["import-base", str(tiny_gguf)])
    # Assert: written to <bases>/tiny-llama; model.base=tiny-llama finds it; the printed command uses the name
    assert code == 0
    assert (tmp_path / "bases" / "tiny-llama" / "config.json").is_file()
    assert resolve_base("tiny-llama") == str(tmp_path / "bases" / "tiny-llama")
    assert "fedlora simulate --set model.base=tiny-llama" in capsys.readouterr().out
    assert base_name("tiny-llama") == "tiny-llama"
