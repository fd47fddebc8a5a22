"""Hot-swap: one base, two published adapters; each answers exactly like its merged model."""

from __future__ import annotations

import pytest

from fedlora.common.config import parse_config
from fedlora.common.evaluate import generate
from fedlora.common.model import load_tokenizer
from fedlora.common.templates import make_format
from fedlora.server.release.hotswap import HotSwap
from fedlora.server.release.merge import max_abs_diff, merge, prompt_logits
from tests.server.adapters import write_noisy_adapter

pytestmark = pytest.mark.slow  # each test trains or loads several models

_FORMAT = make_format(parse_config({}).data, load_tokenizer("embedded"))  # hot-swap takes formatted prompts
PROMPTS = [_FORMAT.prompt("Extract the transaction as JSON.", "Card ending 0463 - 12.50 EUR at Maple Cafe."),
           _FORMAT.prompt("Extract the visit as JSON.", "Anna Kim, 41, has asthma; given salbutamol."),
           _FORMAT.prompt("Say hello.")]


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two adapter versions and their merged models."""
    cfg = parse_config({})
    root = tmp_path_factory.mktemp("versions")
    out = {}
    for name, seed in (("v1", 11), ("v2", 12)):
        adapter = write_noisy_adapter(root / name / "adapter", cfg, seed=seed, scale=0.2)
        merge(adapter, root / name / "merged", cfg.model, prompts=PROMPTS)
        out[name] = root / name
    return cfg, out


@pytest.fixture(scope="module")
def swap(versions):
    cfg, dirs = versions
    return HotSwap(cfg.model, {name: d / "adapter" for name, d in dirs.items()})


def _merged(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("name", ["v1", "v2", "v1"])
def test_each_adapter_answers_like_its_merged_model(versions, swap, name):
    # Prepare
    _, dirs = versions
    model, tok = _merged(dirs[name] / "merged")
    # Execute
    swap.use(name)
    answers = swap.generate(PROMPTS, max_new_tokens=16)
    logits = swap.logits(PROMPTS)
    # Assert
    assert answers == generate(model, tok, PROMPTS, max_new_tokens=16, batch_size=8)
    assert max_abs_diff(logits, prompt_logits(model, tok, PROMPTS)) <= 1e-4


def test_the_two_versions_really_differ(swap):
    first = swap.use("v1").logits(PROMPTS)
    second = swap.use("v2").logits(PROMPTS)
    assert max_abs_diff(first, second) > 1e-2


def test_unknown_adapter_is_refused(swap):
    with pytest.raises(KeyError, match="loaded: v1, v2"):
        swap.use("v3")
