"""``fedlora dpo | merge | publish``: the after-the-rounds stages, one command each.

Each takes a run directory (``fedlora simulate --run-dir`` or the ServerApp's ``run.dir``)
or a published version (``<registry>/<name>/<version>``); the stages live in
:mod:`fedlora.server.release.stages`.
"""

from __future__ import annotations

import dataclasses
import sys

COMMANDS = ("dpo", "merge", "publish")


def add_commands(sub) -> None:
    """Add the three subcommands to the ``fedlora`` parser."""
    dpo = sub.add_parser("dpo", help="refine a run's aggregated adapter with DPO on preference data",
                         description="DPO (TRL) on the central preference pairs, the aggregate as frozen "
                                     "reference; writes <run>/dpo/adapter and <run>/dpo/dpo.json with held-out "
                                     "preference accuracy / reward margin and tenant holdout exact match.")
    dpo.add_argument("path", help="run directory or published version")
    dpo.add_argument("--preferences", help="directory with train.jsonl and holdout.jsonl "
                                           "(default: <data.dir>/preferences of the run)")
    dpo.add_argument("--out", help="output directory (default: <run>/dpo; required for a published version)")
    dpo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dpo.* key, e.g. dpo.steps=80")
    dpo.add_argument("--public-key", help="the publisher's Ed25519 public key; required for a published version, "
                                          "whose signature is verified before it is used")
    dpo.add_argument("--base", metavar="PATH", help="where the base model is on this machine (a model directory); "
                                                    "its fingerprint must be the one the adapter recorded "
                                                    "(default: the recorded model.base)")

    merge = sub.add_parser("merge", help="merge the final adapter into the fp32 base (Hugging Face model)",
                           description="Merge the run's final adapter (DPO-refined when present) into the base "
                                       "in fp32, save model + tokenizer as safetensors and record the max logit "
                                       "difference against base + adapter.")
    merge.add_argument("path", help="run directory or published version")
    merge.add_argument("--out", help="output directory (default: <run>/merged; required for a published version)")
    merge.add_argument("--public-key", help="the publisher's Ed25519 public key; required for a published version, "
                                            "whose signature is verified before it is used")
    merge.add_argument("--base", metavar="PATH", help="where the base model is on this machine (a model "
                                                      "directory); its fingerprint must be the one the adapter "
                                                      "recorded (default: the recorded model.base)")

    pub = sub.add_parser("publish", help="publish a signed version to a registry directory",
                         description="Copy the final adapter and merged model into <registry>/<name>/<version>/ "
                                     "with a model card, a SHA-256 manifest and an Ed25519 signature.")
    pub.add_argument("path", help="run directory (merged) or published version (to republish)")
    pub.add_argument("--registry", required=True, help="registry root directory")
    pub.add_argument("--name", default="fedlora-model", help="model name (default: fedlora-model)")
    pub.add_argument("--version", default="", help="version label (default: the next free vN)")
    pub.add_argument("--signing-key", required=True, help="Ed25519 private key from `fedlora keys signing`")


def _source(args):
    from fedlora.server.release.artifacts import locate, with_base

    source = locate(args.path, public_key=getattr(args, "public_key", None))
    if args.command == "publish":  # copies files; never loads the base
        return source
    from fedlora.common.model import set_threads

    set_threads(source.cfg.train.threads)  # the run's thread count, as in its own stages
    return with_base(source, getattr(args, "base", None))


def _cmd_dpo(args) -> int:
    from fedlora.server.release.stages import run_dpo
    from fedlora.simulations.release import release_inputs
    from fedlora.simulations.scenario import parse_overrides

    source = _source(args)
    overrides = parse_overrides(args.set or [])
    bad = [k for k in overrides if not k.startswith("dpo.")]
    if bad:
        print(f"fedlora dpo: only dpo.* keys can be set here, not {', '.join(bad)}", file=sys.stderr)
        return 2
    if source.kind == "version" and not args.out:
        print(f"fedlora dpo: {source.root} is a published version and must not change; pass --out DIR",
              file=sys.stderr)
        return 2
    source = dataclasses.replace(source, cfg=source.cfg.replace(**overrides))
    result = run_dpo(source, release_inputs(source.cfg, source.root if source.kind == "run" else None,
                                            preferences_dir=args.preferences), out_dir=args.out)
    b, a = result["before"], result["after"]
    print(f"DPO: {result['steps']} steps, {result['seconds']:.1f} s; held-out preference accuracy "
          f"{100 * b['accuracy']:.1f} % -> {100 * a['accuracy']:.1f} %, reward margin "
          f"{b['reward_margin']:.3f} -> {a['reward_margin']:.3f}")
    for t, em in sorted(result["tenants"].items()):
        print(f"  tenant {t} holdout EM {100 * em['before']:.1f} % -> {100 * em['after']:.1f} %")
    return 0


def _cmd_merge(args) -> int:
    from fedlora.server.release.stages import run_merge
    from fedlora.simulations.release import release_inputs

    source = _source(args)
    report = run_merge(source, release_inputs(source.cfg), out_dir=args.out)
    print(f"merged into fp32: max |logit diff| vs base + adapter = {report.max_abs_diff:.2e} "
          f"on {report.prompts} prompts (tolerance {report.tolerance:.2e} = {report.rtol:g} x the logits' scale "
          f"{report.logit_scale:.3g})")
    return 0


def _cmd_publish(args) -> int:
    from fedlora.server.release.stages import run_publish

    result = run_publish(_source(args), registry=args.registry, name=args.name, signing_key=args.signing_key,
                         version=args.version)
    print(f"published {result.path} ({result.files} files, signed)")
    if result.verified is False:
        print("verification FAILED:\n  - " + "\n  - ".join(result.problems), file=sys.stderr)
        return 1
    if result.verified:
        print(f"verified with {result.public_key}")
    return 0


def main_release(args) -> int:
    """Run one of :data:`COMMANDS`; errors a user can fix are printed by ``fedlora``'s main."""
    return {"dpo": _cmd_dpo, "merge": _cmd_merge, "publish": _cmd_publish}[args.command](args)
