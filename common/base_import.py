"""Turn a GGUF file or a Hugging Face model directory into a base directory fedlora can train on.

fedlora loads bases with ``from_pretrained`` from safetensors (fp32, bf16, or quantized to
NF4 at load time), so a GGUF (llama.cpp's quantized format, how many small instruct models
are shipped) is dequantized once, here, and saved as a plain Hugging Face directory:
``config.json``, ``model.safetensors``, the tokenizer files and ``generation_config.json``.
Beside them :data:`fedlora.common.model.BASE_RECORD` says what the base is: its portable name
(written into every adapter trained on it, instead of this machine's path), where it came
from and that file's SHA-256, its fingerprint (:func:`fedlora.common.model.base_fingerprint`), dtype
and parameter count.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from fedlora.common.files import atomic_dir, file_digest, pickle_suffix
from fedlora.common.model import BASE_RECORD, base_fingerprint

DTYPES = ("fp32", "bf16")
GGUF_MAGIC = b"GGUF"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
# llama.cpp's file-name suffixes for the quantization type: ``model.Q4_1.gguf``, ``model-f16.gguf``.
_QUANT_SUFFIX = re.compile(r"[.-](I?Q\d[A-Za-z0-9_]*|F16|F32|BF16)$", re.IGNORECASE)


class BaseImportError(ValueError):
    """The source cannot be imported as asked (missing, not GGUF, unsupported, output in the way)."""


@dataclass(frozen=True)
class ImportedBase:
    """What :func:`import_base` wrote; also the content of the record file (less ``out_dir``)."""

    out_dir: Path
    name: str            # portable name: written into adapters trained on this base
    source: str          # the GGUF file's or HF directory's name (no path: it is this machine's)
    source_kind: str     # "gguf" or "hf"
    source_sha256: str   # the GGUF file's SHA-256, or the HF directory's base fingerprint
    fingerprint: str     # fedlora.common.model.base_fingerprint of out_dir
    dtype: str
    parameters: int
    architecture: str
    bytes: int           # size of out_dir
    seconds: float

    def record(self) -> dict:
        out = asdict(self)
        out.pop("out_dir")
        return {"fedlora_base": 1, **out, "imported": _now()}


def default_name(source: Path) -> str:
    """``SmolLM2-135M-Instruct`` for ``SmolLM2-135M-Instruct.Q4_1.gguf`` or a directory of that name."""
    stem = source.stem if source.is_file() else source.resolve().name
    return _QUANT_SUFFIX.sub("", stem) or stem


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise BaseImportError(f"--name {name!r} is not a portable base name: use letters, digits, '.', '_' or '-', "
                              "optionally as ORG/NAME like a hub id (no absolute path)")
    return name


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BaseImportError(f"--out {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BaseImportError(f"--out {out} exists and is not empty; choose another directory or pass --force "
                              "to replace it")


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file, refusing files that are not GGUF."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise BaseImportError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); give a "
                              ".gguf file or a Hugging Face model directory")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise BaseImportError("importing a GGUF file needs the gguf package: pip install gguf") from None
    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    except Exception as err:  # a truncated or corrupt file: gguf raises ValueError, struct.error...
        raise BaseImportError(f"{path}: unreadable GGUF file ({str(err).splitlines()[0] if str(err) else err!r})") \
            from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if not arch:
        raise BaseImportError(f"{path}: the GGUF file names no architecture (general.architecture)")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise BaseImportError(f"{path}: architecture {arch!r} cannot be dequantized by transformers; supported: "
                              + ", ".join(sorted(GGUF_SUPPORTED_ARCHITECTURES)))
    return arch


def _load(source: Path, kind: str, say: Callable[[str], None]):
    """(model in fp32, tokenizer) from a GGUF file or an HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "hf":
        return (AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32),
                AutoTokenizer.from_pretrained(str(source)))
    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    say("dequantizing the weights to fp32 (transformers' GGUF loader)")
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf"), although its
    # weights are plain fp32 tensors by now: rebuild it from its config without that mark.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    return model, tokenizer


def import_base(source: str | Path, out_dir: str | Path, *, name: str | None = None, dtype: str = "fp32",
                force: bool = False, say: Callable[[str], None] = print) -> ImportedBase:
    """Dequantize/convert ``source`` into ``out_dir`` (written atomically) with its record file."""
    import torch
    from transformers import GenerationConfig

    start = time.perf_counter()
    src, out = Path(source).expanduser(), Path(out_dir).expanduser()
    if dtype not in DTYPES:
        raise BaseImportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not src.exists():
        raise BaseImportError(f"{src}: no such file or directory; give a .gguf file or a Hugging Face model "
                              "directory")
    name = check_name(name or default_name(src))
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise BaseImportError(f"--out {out} holds the source {src}; write the base to another directory")
    _check_out(out, force)
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise BaseImportError(f"{src}: a directory without config.json is not a Hugging Face model directory")
        kind, arch = "hf", json.loads((src / "config.json").read_text()).get("model_type", "?")
        say(f"reading the Hugging Face model directory {src}")
        source_sha = base_fingerprint(str(src))
    else:
        kind, arch = "gguf", gguf_architecture(src)
        size = src.stat().st_size
        say(f"hashing {src.name} ({size / 1e6:.0f} MB, architecture {arch})")
        source_sha = file_digest(src)[0]
    try:
        model, tokenizer = _load(src, kind, say)
    except (OSError, ValueError, KeyError, NotImplementedError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BaseImportError(f"{src}: transformers could not load it as a causal language model ({first})") \
            from None
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    say(f"saving {parameters / 1e6:.1f}M parameters as {dtype} safetensors to {out}")
    with atomic_dir(out) as tmp:  # replaces an existing --out (--force) only once the new one is complete
        model.config.use_cache = True
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if not (tmp / "generation_config.json").is_file():
            GenerationConfig.from_model_config(model.config).save_pretrained(str(tmp))
        for path in tmp.iterdir():  # some writers leave 0600; a base is read by every process that trains
            path.chmod(0o644)
        pickles = [p.name for p in tmp.iterdir() if pickle_suffix(p.name)]
        if pickles:
            raise BaseImportError(f"saving the base wrote pickle files {pickles}; refusing to keep them")
        say("fingerprinting the saved base")
        written = ImportedBase(
            out_dir=out, name=name, source=src.name if kind == "gguf" else src.resolve().name, source_kind=kind,
            source_sha256=source_sha, fingerprint=base_fingerprint(str(tmp)), dtype=dtype, parameters=parameters,
            architecture=str(arch), bytes=sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()),
            seconds=round(time.perf_counter() - start, 1))
        (tmp / BASE_RECORD).write_text(json.dumps(written.record(), indent=2, sort_keys=True) + "\n")
    return written


def read_record(base_dir: str | Path) -> dict | None:
    """An imported base's record, or None for a directory ``import-base`` did not write."""
    path = Path(base_dir) / BASE_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
