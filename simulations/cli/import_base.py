"""``fedlora import-base``: a GGUF file or Hugging Face directory -> a base directory fedlora trains on.

The conversion is :func:`fedlora.common.base_import.import_base`; this module only parses the
command line and prints what was written.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_command(sub) -> None:
    """Add ``import-base`` to the ``fedlora`` parser."""
    imp = sub.add_parser(
        "import-base", help="import a GGUF file or Hugging Face model directory as a base model",
        description="Dequantize a GGUF file (or copy a local Hugging Face model directory) into a base directory: "
                    "config.json, model.safetensors, tokenizer files, generation_config.json and fedlora-base.json "
                    "(portable name, source SHA-256, base fingerprint, dtype, parameter count). Train on it with "
                    "`fedlora simulate --set model.base=DIR`.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("source", help="a .gguf file, or a local Hugging Face model directory")
    imp.add_argument("--out", help="the base directory to write (must not exist or be empty; default: "
                                   "$FEDLORA_BASES/NAME or ~/.fedlora/bases/NAME, where model.base=NAME finds it)")
    imp.add_argument("--name", help="the base's portable name, recorded in every adapter trained on it "
                                    "(default: from the file or directory name, e.g. SmolLM2-135M-Instruct)")
    imp.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="saved precision (default: fp32)")
    imp.add_argument("--force", action="store_true", help="replace a non-empty --out")


def main_import_base(args) -> int:
    from fedlora.common.base_import import import_base

    def say(line: str) -> None:
        print(f"fedlora import-base: {line}", flush=True)

    from fedlora.common.base_import import default_name
    from fedlora.common.model import bases_dir, imported_base

    out = args.out or bases_dir() / (args.name or default_name(Path(args.source)))
    base = import_base(args.source, out, name=args.name, dtype=args.dtype, force=args.force, say=say)
    found = imported_base(base.name)  # model.base=NAME finds it in the bases directory
    known = found is not None and found.resolve() == Path(base.out_dir).resolve()
    print(f"imported {base.name}: {base.parameters / 1e6:.1f}M parameters, {base.dtype}, "
          f"{base.bytes / 1e6:.0f} MB in {base.out_dir} ({base.seconds:.0f} s)\n"
          f"  source {base.source} sha256 {base.source_sha256}\n"
          f"  base fingerprint {base.fingerprint}\n"
          f"  train on it: fedlora simulate --set model.base={base.name if known else base.out_dir}")
    return 0
