"""Base-model loading and PEFT attachment — the only place fedlora builds a model.

The embedded tiny base, a user's local directory and a cached hub id all go through the
same ``from_pretrained`` path. Precision is fp32, bf16 or 4-bit NF4 with double
quantization (QLoRA, via bitsandbytes); 4-bit layers compute in fp32 on CPU and bf16 on
CUDA unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlora.common.config import AdapterConfig, ModelConfig

EMBEDDED = "embedded"
_WEIGHTS = "model.safetensors"
BASE_RECORD = "fedlora-base.json"  # written by `fedlora import-base` beside an imported base
# Files that make up a base: config, weights, tokenizer (vocabularies, merges, the chat template).
_FINGERPRINTED = (".json", ".safetensors", ".model", ".txt", ".jinja")


BASES_ENV = "FEDLORA_BASES"  # where `fedlora import-base` puts bases by default


def bases_dir() -> Path:
    """The directory of imported bases: ``$FEDLORA_BASES``, else ``~/.fedlora/bases``."""
    return Path(os.environ.get(BASES_ENV) or Path.home() / ".fedlora" / "bases").expanduser()


def imported_base(name: str) -> Path | None:
    """An imported base known by its portable name (``<bases dir>/NAME``), or None."""
    if not name or "/" in name or name.startswith(".") or name == EMBEDDED:
        return None
    cand = bases_dir() / name
    return cand if (cand / "config.json").is_file() else None


class ModelNotFoundError(FileNotFoundError):
    """The base model is neither a local directory nor in the local Hugging Face cache."""


def embedded_base_dir() -> Path:
    """Directory of the tiny base model that ships with fedlora (package data of
    ``fedlora.simulations``, in a wheel and in a source tree alike)."""
    from importlib.resources import files

    cand = Path(str(files("fedlora.simulations") / "base_model"))
    if (cand / _WEIGHTS).is_file():
        return cand
    raise ModelNotFoundError(
        f"the embedded base model ({cand / _WEIGHTS}) was not found; reinstall fedlora "
        "or rebuild it with `python -m fedlora.simulations.build_base`"
    )


def resolve_base(name: str, override: str | Path | None = None) -> str:
    """A path or hub id that ``from_pretrained`` can open offline, or a clear error.

    ``name`` is what a config or an artifact records (``embedded``, a local directory, a hub
    id, or an imported base's portable name); ``override`` (``--base PATH``) says where the
    base lies on this machine and wins over the name, since a recorded name or path is the
    writing machine's, not necessarily this one's.
    """
    if override is not None:
        path = Path(override).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"--base {override}: not a model directory (no config.json there); "
                                     "give the directory holding the base's config.json and weights")
        return str(path.resolve())
    if name == EMBEDDED:
        return str(embedded_base_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no config.json; "
                                     "point model.base at a Hugging Face model directory")
        return str(path)
    if (imported := imported_base(name)) is not None:
        return str(imported)
    if path.is_absolute() or name.startswith("."):
        raise ModelNotFoundError(f"model directory {name} does not exist on this machine; set model.base (or "
                                 "--base PATH for merge, dpo and verify) to where the base is here")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not even a valid hub id (huggingface_hub's HFValidationError)
        cached = None
    if cached is None or not isinstance(cached, str):
        raise ModelNotFoundError(
            f"model {name!r} is not in the local Hugging Face cache nor a local directory, and fedlora runs "
            f"offline; download it on a connected machine (huggingface-cli download {name}) and copy the cache "
            "over, or set model.base (for merge, dpo and verify: --base PATH) to a local directory"
        )
    return name


def base_name(name: str) -> str:
    """The base's portable name, written into every ``adapter_config.json`` fedlora writes.

    A hub id stays as given, the embedded base is ``embedded``, an imported base
    (``fedlora import-base``) is the name in its record; any other local directory is known
    by its directory name. Never an absolute path: that is only true on the writing machine.
    """
    if name == EMBEDDED:
        return EMBEDDED
    path = Path(name).expanduser()
    if not path.is_dir():  # a hub id as given; a directory of another machine by its own name
        return path.name if path.is_absolute() or name.startswith(".") else name
    try:
        if path.resolve() == embedded_base_dir().resolve():
            return EMBEDDED
    except ModelNotFoundError:
        pass
    record = path / BASE_RECORD
    if record.is_file():
        try:
            recorded = json.loads(record.read_text()).get("name")
        except ValueError:
            recorded = None
        if isinstance(recorded, str) and recorded:
            return recorded
    return path.resolve().name


class BaseMismatchError(ValueError):
    """The base found on this machine is not the one an artifact was trained on."""


def base_fingerprint(name: str, override: str | Path | None = None) -> str:
    """SHA-256 over the base's config, tokenizer and weight files, recorded beside every artifact.

    Only file names and contents count, so a base moved or copied elsewhere keeps its
    fingerprint; an imported base's own record (``fedlora-base.json``) is left out, since it
    holds the fingerprint itself.
    """
    root = Path(resolve_base(name, override))
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(name, local_files_only=True))
    digest = hashlib.sha256()
    for path in sorted(root.glob("*")):
        if path.name == BASE_RECORD:
            continue
        if path.suffix in _FINGERPRINTED and path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def require_base(name: str, expected_sha256: str | None, *, override: str | Path | None = None,
                 what: str = "the adapter") -> str:
    """Resolve the base (``override`` first) and refuse it when its fingerprint is not the recorded one.

    Merging or serving an adapter on another base gives wrong answers without any error, so
    the fingerprint an artifact records is checked before its weights are used. Returns the
    resolved path or hub id.
    """
    resolved = resolve_base(name, override)
    if expected_sha256:
        found = base_fingerprint(name, override)
        if found != expected_sha256:
            where = f"--base {override}" if override is not None else f"base {name!r} ({resolved})"
            raise BaseMismatchError(
                f"{where} is not the base {what} was trained on: expected SHA-256 {expected_sha256}, found "
                f"{found}; pass --base with the directory of the original base (`fedlora import-base` "
                "records its fingerprint in fedlora-base.json)")
    return resolved


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("model.device=cuda but no CUDA device is visible; use auto or cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.compute_dtype]


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_base(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: ModelConfig, *, for_training: bool = True, precision: str | None = None):
    """The frozen base model on its device, in the configured precision."""
    from transformers import AutoModelForCausalLM

    device = pick_device(cfg)
    precision = precision or cfg.precision
    kwargs: dict = {}
    if precision == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(cfg, device),
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
        kwargs["dtype"] = compute_dtype(cfg, device)
    else:
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(resolve_base(cfg.base), **kwargs)
    if precision != "nf4":
        model.to(device)
    if precision == "nf4" and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = not for_training
    return model


def peft_config(cfg: AdapterConfig):
    """The PEFT config object for the configured method."""
    from peft import IA3Config, LoraConfig, TaskType

    targets = "all-linear" if cfg.target_modules == "all-linear" else [
        t.strip() for t in cfg.target_modules.split(",") if t.strip()]
    if cfg.method == "ia3":
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets,
                         feedforward_modules=[] if targets != "all-linear" else None)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha,
                      lora_dropout=cfg.dropout, target_modules=targets,
                      use_dora=cfg.method == "dora", bias="none")


def attach_adapter(base, cfg: AdapterConfig, *, seed: int = 0):
    """Wrap ``base`` in a fresh trainable PEFT adapter (deterministic init)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base, peft_config(cfg))


@dataclass
class Loaded:
    """A base with one adapter attached, plus its tokenizer."""

    model: object
    tokenizer: object
    device: torch.device


def load_model(mcfg: ModelConfig, acfg: AdapterConfig, *, seed: int = 0,
               for_training: bool = True) -> Loaded:
    tok = load_tokenizer(mcfg.base)
    base = load_base(mcfg, for_training=for_training)
    model = attach_adapter(base, acfg, seed=seed)
    return Loaded(model=model, tokenizer=tok, device=pick_device(mcfg))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


_DEFAULT_THREADS: list[int] = []  # torch's own thread count, before any run set one


def set_threads(n: int) -> None:
    """torch's intra-op threads for this run: ``n``, or (n <= 0) ``OMP_NUM_THREADS``, else
    torch's own default -- restored, so a long-lived process (the tenant worker) does not
    keep an earlier run's count."""
    if not _DEFAULT_THREADS:
        _DEFAULT_THREADS.append(torch.get_num_threads())
    if n > 0:
        want = n
    elif os.environ.get("OMP_NUM_THREADS"):
        want = int(os.environ["OMP_NUM_THREADS"])
    else:
        want = _DEFAULT_THREADS[0]
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
