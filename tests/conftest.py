"""Shared fixtures: offline switches, small configs on the embedded base, synthetic tenants;
how `make test` spreads the suite over the cores (pytest-xdist)."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per worker (and per process it starts): with a worker per core, torch's
    # default of a thread per core oversubscribes the machine and its spinning threads stall.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from fedlora.common.offline import quiet_and_offline  # noqa: E402

quiet_and_offline()

# The longest modules start first, so the workers finish together (a scheduling hint only:
# a module missing here still runs, later).
LONGEST_FIRST = ("integration/test_resume.py", "integration/test_deployment.py", "integration/test_lora_rules.py",
                 "integration/test_attacks.py", "integration/test_policy_deployment.py", "integration/test_secagg.py",
                 "integration/test_flwr_cli.py", "integration/test_encoding.py",
                 "integration/test_policy_simulation.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::", 1)[0].removeprefix("tests/")
        if path in LONGEST_FIRST:
            return LONGEST_FIRST.index(path)
        return len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=rank)  # stable: each module keeps its own order


# Modules that share one session-scoped fixture run on one worker, so it is built once. (Named
# here, not with ``xdist_group`` marks: pytest-xdist 3.8 tags a marked test by rewriting
# ``item._nodeid``, which pytest 9 no longer reads, so the marks group nothing.)
SHARED_FIXTURE = {"integration/test_simulation.py": "tiny_run", "integration/test_resume.py": "tiny_run"}


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``, but by module: a module's tests go to one worker, so module- and
    session-scoped fixtures (a federation, a SuperLink) are built once per module; the modules
    of :data:`SHARED_FIXTURE` that share a session fixture go together."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleOrGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SHARED_FIXTURE.get(module.removeprefix("tests/"), module)

    return ModuleOrGroup(config, log)


@pytest.fixture(autouse=True, scope="session")
def _private_homes(tmp_path_factory):
    """Keep Hugging Face caches and fedlora's home (synthetic tenants, the Flower app, bare runs)
    out of the user's home during tests; subprocesses inherit both."""
    os.environ.setdefault("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    os.environ.setdefault("FEDLORA_HOME", str(tmp_path_factory.mktemp("fedlora_home")))
    yield


@pytest.fixture(scope="session")
def tenants_dir(tmp_path_factory):
    """4 small synthetic tenants (seeded), with preference and probe files."""
    from fedlora.simulations.synthetic import write_tenants

    out = tmp_path_factory.mktemp("tenants")
    write_tenants(out, num_tenants=4, train_size=96, holdout_size=24, preference_size=32, seed=0)
    return out


@pytest.fixture(scope="session")
def small_cfg():
    """Defaults with a budget small enough for unit tests."""
    from fedlora.common.config import parse_config

    return parse_config({"train.local-steps": 4, "train.batch-size": 8, "eval.batch-size": 24})


# ChatML, as Qwen2 / SmolLM2 instruct tokenizers write it: every turn
# "<|im_start|>{role}\n{content}<|im_end|>\n", and "<|im_start|>assistant\n" as the
# generation prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chatml_tokenizer(*, eos_is_im_end: bool = False):
    """The embedded base's tokenizer with ``<|im_start|>``/``<|im_end|>`` added as special
    tokens (ids 3072, 3073) and a ChatML chat template; ``eos_is_im_end`` makes
    ``<|im_end|>`` its EOS, as in Qwen2-Instruct."""
    from fedlora.common.model import load_tokenizer

    tok = load_tokenizer("embedded")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TEMPLATE
    if eos_is_im_end:
        tok.eos_token = "<|im_end|>"
    return tok


def build_qwen2_chat_base(out_dir, *, seed: int = 0):
    """A tiny randomly initialised Qwen2 model (another architecture family than the
    embedded Llama-style base: its own module names, grouped-query attention, q/k/v
    biases) saved with its tokenizer into ``out_dir``, usable as ``model.base=<out_dir>``.

    The tokenizer has a ChatML chat template (so ``data.template=auto`` picks the chat
    template) and ``<|im_end|>`` as EOS; the generation config stops at ``<|im_end|>`` and
    ``</s>``. About 0.5 M parameters; builds in well under a second.
    """
    from pathlib import Path

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    tok = chatml_tokenizer(eos_is_im_end=True)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=im_end, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [im_end, tok.convert_tokens_to_ids("</s>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen2_chat_base(tmp_path_factory):
    """Directory of a tiny random Qwen2 base with a ChatML tokenizer (see
    :func:`build_qwen2_chat_base`): pass it as ``model.base``, e.g.
    ``parse_config({"model.base": str(qwen2_chat_base)})``."""
    return build_qwen2_chat_base(tmp_path_factory.mktemp("qwen2_chat_base"))
