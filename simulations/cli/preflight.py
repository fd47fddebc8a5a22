"""Checks before Flower starts: every problem a user can fix, one line each, in seconds.

``fedlora simulate``, ``fedlora deploy run`` and ``fedlora deploy supernode`` call these
before they start any Flower process, so a malformed tenant line, a missing base model,
an unwritable run directory or an unreadable key is reported at once (exit code 2)
instead of inside a Ray traceback minutes later.

The checks avoid importing torch: the model is resolved from its files, and its config is
loaded with ``transformers.AutoConfig`` (no weights read) only when every other check
passed, because importing transformers alone takes seconds; problems found before that
are reported at once.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "base_model"  # model.base = "embedded"


class PreflightError(ValueError):
    """Every problem found before the run, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Preflight:
    """Collects problems; :meth:`raise_if_any` raises one :class:`PreflightError` for all."""

    problems: list[str] = field(default_factory=list)

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def raise_if_any(self) -> None:
        if self.problems:
            raise PreflightError(self.problems)

    # -- data -------------------------------------------------------------------
    def tenant_file(self, path: Path, *, tenant: str, fmt: str = "auto", required: bool = True) -> None:
        """Parse one tenant's JSONL; the first bad row is reported with file, line and field."""
        from fedlora.common.data import DataError, read_examples

        if not path.is_file():
            if required:
                self.add(f"tenant {tenant}: {path}: file not found")
            return
        try:
            read_examples(path, fmt=fmt)
        except DataError as err:
            self.add(f"tenant {tenant}: {err}")
        except (OSError, UnicodeDecodeError) as err:
            self.add(f"tenant {tenant}: {path}: cannot read ({err})")

    def simulation_tenants(self, data_dir: str, tenants: int, *, fmt: str = "auto") -> None:
        """``data.dir``: tenant_XXX/train.jsonl and holdout.jsonl of every simulated tenant."""
        from fedlora.common.data import tenant_paths

        root = Path(data_dir)
        if not root.is_dir():
            self.add(f"data.dir {root} is not a directory (leave data.dir empty for synthetic tenants)")
            return
        for t in range(tenants):
            train, holdout = tenant_paths(root, t)
            self.tenant_file(train, tenant=str(t), fmt=fmt)
            self.tenant_file(holdout, tenant=str(t), fmt=fmt)

    # -- model ------------------------------------------------------------------
    def tenant_policy(self, path: str | Path, *, where: str, data: Path | None = None) -> None:
        """A tenant policy file that parses and keeps its own rules (and, with ``data``, can keep them
        for that training file: its delta at most 1 / records)."""
        from fedlora.client.policy import PolicyError, data_problems, load_policy

        try:
            policy = load_policy(path)
        except PolicyError as err:
            self.add(f"{where}: {err}")
            return
        if data is not None and data.is_file():
            from fedlora.client.policy_mod import count_records

            self.problems += [f"{where} {path} with {data}: {p}" for p in data_problems(policy, count_records(data))]

    def tenant_policies(self, value: str, tenants: int, data_dir: str) -> None:
        """``simulation.tenant-policy``: one file, or one entry per simulated tenant."""
        from fedlora.common.data import tenant_paths

        files = [f.strip() for f in value.split(",")]
        if len(files) > 1 and len(files) != tenants:
            self.add(f"simulation.tenant-policy names {len(files)} files for {tenants} tenants; give one file for "
                     "all, or one entry per tenant (an empty entry: no policy)")
            return
        for t in range(tenants):
            f = files[t] if len(files) > 1 else files[0]
            if f:
                self.tenant_policy(f, where=f"simulation.tenant-policy (tenant {t})",
                                   data=tenant_paths(data_dir, t)[0] if data_dir else None)
            if len(files) == 1:
                break

    def base_model(self, name: str, *, load_config: bool = True, template: str = "auto") -> None:
        """The base resolves offline (a directory with config.json, or the HF cache), its
        config.json names a ``model_type`` and, with ``load_config``, ``AutoConfig`` loads it
        (importing transformers takes seconds, so callers skip it when other checks failed)."""
        path = self._resolve_model(name)
        if path is None:
            return
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as err:
            self.add(f"model.base {name!r}: {path / 'config.json'} is not valid JSON ({err})")
            return
        if not isinstance(config, dict) or not config.get("model_type"):
            self.add(f"model.base {name!r}: {path / 'config.json'} names no model_type; not a Hugging Face model")
            return
        if template == "chat" and not _has_chat_template(path):
            self.add(f"model.base {name!r}: data.template is chat but its tokenizer has no chat template "
                     "(tokenizer_config.json has no chat_template, no chat_template.jinja); use data.template=auto "
                     "or alpaca")
        if not load_config:
            return
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(str(path))
        except Exception as err:  # transformers raises ValueError, KeyError, OSError...
            self.add(f"model.base {name!r}: its config does not load ({type(err).__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else ''})")

    def _resolve_model(self, name: str) -> Path | None:
        if name == "embedded":
            if not (EMBEDDED_DIR / "model.safetensors").is_file():
                self.add("model.base 'embedded': simulations/base_model/model.safetensors is missing; rebuild it "
                         "with `python -m fedlora.simulations.build_base`")
                return None
            return EMBEDDED_DIR
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                self.add(f"model.base {name!r}: directory {path} has no config.json (a Hugging Face model "
                         "directory is needed)")
                return None
            return path
        from fedlora.common.model import imported_base

        if (imported := imported_base(name)) is not None:
            return imported
        if path.is_absolute() or name.startswith("."):
            self.add(f"model.base {name!r}: directory {path} does not exist")
            return None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            self.add(f"model.base {name!r}: not a local directory and not in the local Hugging Face cache "
                     "(fedlora runs offline; copy the model over or point model.base at a directory)")
            return None
        return Path(cached).parent

    # -- files ------------------------------------------------------------------
    def writable_dir(self, path: Path, *, what: str = "run directory") -> None:
        """``path`` exists as a writable directory or can be created (nothing is left behind)."""
        probe = Path(path)
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            self.add(f"{what} {path}: cannot be created, {probe} is not a directory")
            return
        try:
            fd, name = tempfile.mkstemp(dir=probe, prefix=".fedlora-preflight-")
            os.close(fd)
            os.unlink(name)
        except OSError as err:
            self.add(f"{what} {path}: {probe} is not writable ({err.strerror or err})")

    def readable(self, path: str | Path, *, what: str) -> bytes | None:
        p = Path(path).expanduser()
        try:
            return p.read_bytes()
        except FileNotFoundError:
            self.add(f"{what} {p}: file not found")
        except IsADirectoryError:
            self.add(f"{what} {p}: is a directory, not a file")
        except OSError as err:
            self.add(f"{what} {p}: cannot read ({err.strerror or err})")
        return None

    def certificate(self, path: str | Path, *, what: str = "CA certificate") -> None:
        data = self.readable(path, what=what)
        if data is None:
            return
        from cryptography import x509

        try:
            x509.load_pem_x509_certificate(data)
        except ValueError:
            self.add(f"{what} {path}: not a PEM certificate (use ca.crt from `fedlora certs`)")

    def node_key(self, path: str | Path) -> None:
        """A SuperNode's private key (OpenSSH format, `fedlora keys node NAME`)."""
        data = self.readable(path, what="SuperNode private key")
        if data is None:
            return
        from cryptography.hazmat.primitives import serialization

        try:
            serialization.load_ssh_private_key(data, password=None)
        except (ValueError, TypeError):
            self.add(f"SuperNode private key {path}: not an unencrypted OpenSSH private key "
                     "(use the file `fedlora keys node NAME` wrote, not the .pub)")

    def signing_key(self, path: str | Path) -> None:
        if self.readable(path, what="signing key") is None:
            return
        from fedlora.common.credentials import load_private_key

        try:
            load_private_key(path)
        except (OSError, ValueError) as err:
            self.add(f"signing key {path}: {err}")


def _has_chat_template(model_dir: Path) -> bool:
    """Whether the tokenizer files in ``model_dir`` carry a chat template (without loading them)."""
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def check_simulation(cfg) -> None:
    """Everything ``fedlora simulate`` needs before Flower starts."""
    pf = Preflight()
    if cfg.data.dir:
        pf.simulation_tenants(cfg.data.dir, cfg.simulation.tenants, fmt=cfg.data.format)
    if cfg.simulation.tenant_policy:
        pf.tenant_policies(cfg.simulation.tenant_policy, cfg.simulation.tenants, cfg.data.dir)
    pf.writable_dir(Path(cfg.run.dir))
    if cfg.publish.enabled and cfg.publish.signing_key:
        pf.signing_key(cfg.publish.signing_key)
    pf.base_model(cfg.model.base, load_config=not pf.problems, template=cfg.data.template)
    pf.raise_if_any()


def check_deployment_run(cfg, *, ca_cert: str | Path) -> None:
    """``fedlora deploy run``: the CA, the base model (the ServerApp loads it), the run directory."""
    pf = Preflight()
    pf.certificate(ca_cert)
    pf.writable_dir(Path(cfg.run.dir))
    if cfg.publish.enabled and cfg.publish.signing_key:
        pf.signing_key(cfg.publish.signing_key)
    pf.base_model(cfg.model.base, load_config=not pf.problems, template=cfg.data.template)
    pf.raise_if_any()


def check_supernode(*, ca_cert: str | Path, private_key: str | Path, data: str | Path,
                    holdout: str | Path | None, tenant_id: int, policy: str | Path | None = None) -> None:
    """``fedlora deploy supernode``: the tenant's files, its key, the federation's CA, its policy."""
    from fedlora.common.data import holdout_for

    pf = Preflight()
    pf.certificate(ca_cert)
    pf.node_key(private_key)
    pf.tenant_file(Path(data), tenant=str(tenant_id))
    pf.tenant_file(Path(holdout) if holdout else holdout_for(data), tenant=str(tenant_id), required=bool(holdout))
    if policy is not None:
        pf.tenant_policy(policy, where="--policy", data=Path(data))
    pf.raise_if_any()
