"""``fedlora flwr-config``: connections for Flower's own CLI (``flwr run``, ``ls``, ``log``, ``stop``).

Flower 1.42 reads its SuperLink connections from ``$FLWR_HOME/config.toml`` (default
``~/.flwr``); ``flwr run APP NAME`` submits the app in directory ``APP`` to connection ``NAME``.
The command prints the installed fedlora's app directory (:mod:`fedlora.simulations.cli.flower_app`);
in a source tree ``flwr run .`` submits the same app.
This module merges fedlora's connections into that file and leaves every other connection
as it was (the file is read with ``tomllib``; the old file is kept as ``config.toml.bak``):

- ``fedlora-sim``: Flower's local simulation (``address = ":local:"``: ``flwr`` starts a
  ``flower-superlink --simulation`` on 127.0.0.1 when none answers) with ``num-supernodes``
  tenants and the CPUs / GPU share each tenant's ClientApp gets;
- ``fedlora`` (with ``--superlink HOST:PORT --ca ca.crt``): a deployment SuperLink over TLS,
  trusting the CA ``fedlora certs`` made.

Flower's ``config.toml`` has no switch for telemetry, update checks or the SuperLink's runtime
dependency installation: they are environment variables, read by ``flwr`` and by the local
SuperLink it starts (which inherits ``flwr``'s environment). ``fedlora.env`` beside the config
holds them; ``source`` it before ``flwr``.
"""

from __future__ import annotations

import os
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any, Mapping

from fedlora.common.files import write_atomic

SIM_CONNECTION = "fedlora-sim"
CONFIG_FILE = "config.toml"
ENV_FILE = "fedlora.env"


class FlwrConfigError(ValueError):
    """The Flower config cannot be read or the connection asked for is invalid; says what to fix."""


def flwr_home(path: str | Path | None = None) -> Path:
    """The directory ``flwr`` reads: ``path``, else ``$FLWR_HOME``, else ``~/.flwr``; absolute."""
    return Path(path or os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser().resolve()


def local_connection(*, num_supernodes: int = 4, cpus_per_tenant: int = 1, gpus_per_tenant: float = 0.0) -> dict:
    """Flower's local simulation with ``num_supernodes`` tenants (one synthetic tenant per SuperNode)."""
    problems = [f"{name} = {value!r}: {want}" for name, value, ok, want in (
        ("--num-supernodes", num_supernodes, isinstance(num_supernodes, int) and num_supernodes >= 1,
         "expected an integer >= 1"),
        ("--cpus-per-tenant", cpus_per_tenant, isinstance(cpus_per_tenant, int) and cpus_per_tenant >= 1,
         "expected an integer >= 1"),
        ("--gpus-per-tenant", gpus_per_tenant, isinstance(gpus_per_tenant, (int, float)) and gpus_per_tenant >= 0,
         "expected a number >= 0 (a share of one GPU, e.g. 0.25)")) if not ok]
    if problems:
        raise FlwrConfigError("; ".join(problems))
    resources: dict[str, Any] = {"num-cpus": cpus_per_tenant}
    if gpus_per_tenant:
        resources["num-gpus"] = float(gpus_per_tenant)
    return {"address": ":local:",
            "options": {"num-supernodes": num_supernodes, "backend": {"client-resources": resources}}}


def superlink_connection(address: str, ca_cert: str | Path) -> dict:
    """A deployment SuperLink at ``HOST:PORT`` over TLS, trusting ``ca_cert`` (stored absolute)."""
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise FlwrConfigError(f"--superlink {address!r}: expected HOST:PORT, e.g. superlink.example.org:9093")
    ca = Path(ca_cert).expanduser().resolve()
    if not ca.is_file():
        raise FlwrConfigError(f"--ca {ca_cert}: no such file; give the CA certificate `fedlora certs` wrote (ca.crt)")
    return {"address": str(address), "root-certificates": str(ca)}


def read_config(path: Path) -> dict:
    """The parsed ``config.toml`` (empty when there is none)."""
    if not path.is_file():
        return {}
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise FlwrConfigError(f"{path} is not valid TOML ({err}); fix or move it, then run the command again") from None
    if not isinstance(doc.get("superlink", {}), dict):
        raise FlwrConfigError(f"{path}: [superlink] must be a table of connections; fix or move the file")
    return doc


def merge_connections(home: str | Path, connections: Mapping[str, dict], *, default: str | None = None,
                      make_default: bool = False) -> Path:
    """Add or replace ``connections`` in ``<home>/config.toml``, keeping every other key.

    ``default`` becomes ``[superlink] default`` when the file names none (or with
    ``make_default``); a default the user chose stays otherwise. Returns the file's path."""
    import tomli_w  # Flower's own TOML writer (a dependency of flwr)

    home = Path(home).expanduser().resolve()
    path = home / CONFIG_FILE
    doc = read_config(path)
    links = doc.setdefault("superlink", {})
    links.update({name: dict(conn) for name, conn in connections.items()})
    if default is not None:
        if default not in links or not isinstance(links[default], dict):
            raise FlwrConfigError(f"--default {default!r}: no such connection in {path}; "
                                  f"known: {', '.join(sorted(k for k, v in links.items() if isinstance(v, dict)))}")
        if make_default or not links.get("default"):
            links["default"] = default
    text = tomli_w.dumps(doc)
    if path.is_file():
        old = path.read_bytes()
        if old == text.encode():
            return path
        write_atomic(path.with_name(CONFIG_FILE + ".bak"), old)
    home.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode())
    return path


def offline_env(home: Path) -> dict[str, str]:
    """What ``flwr`` and the SuperLink it starts need in their environment: this ``FLWR_HOME`` and
    fedlora's offline switches (telemetry, update check, runtime installs, Ray, Hugging Face)."""
    from fedlora.common.offline import OFFLINE_ENV

    return {"FLWR_HOME": str(home), **OFFLINE_ENV}


def write_env_file(home: Path) -> Path:
    lines = ["# fedlora: source this file before `flwr`; the local SuperLink flwr starts inherits it.",
             *(f"export {k}={shlex.quote(v)}" for k, v in offline_env(home).items())]
    return write_atomic(home / ENV_FILE, ("\n".join(lines) + "\n").encode())


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #
def add_command(sub) -> None:
    p = sub.add_parser("flwr-config", help="add fedlora's connections to Flower's config.toml (flwr run/ls/log/stop)",
                       description="Merge a local simulation connection (fedlora-sim) and, with --superlink and "
                                   "--ca, a deployment connection (fedlora) into $FLWR_HOME/config.toml, keeping "
                                   "every other connection; write fedlora.env with the offline switches.")
    p.add_argument("--flwr-home", help="Flower's home directory (default: $FLWR_HOME, else ~/.flwr)")
    p.add_argument("--num-supernodes", type=int, default=4,
                   help="simulated tenants of fedlora-sim, one per SuperNode (default: 4)")
    p.add_argument("--cpus-per-tenant", type=int, default=1, help="CPUs per simulated ClientApp (default: 1)")
    p.add_argument("--gpus-per-tenant", type=float, default=0.0,
                   help="share of a GPU per simulated ClientApp (default: 0)")
    p.add_argument("--superlink", metavar="HOST:PORT", help="also add connection 'fedlora' to this SuperLink")
    p.add_argument("--ca", help="the CA certificate the SuperLink's TLS certificate is signed with (with --superlink)")
    p.add_argument("--default", metavar="NAME",
                   help="make NAME the default connection (default: keep the file's; fedlora-sim if it has none)")


def main_flwr_config(args) -> int:
    from fedlora.simulations.cli.deployment import CONNECTION
    from fedlora.simulations.cli.flower_app import app_dir

    if bool(args.superlink) != bool(args.ca):
        print("fedlora flwr-config: --superlink and --ca go together (the deployment connection uses TLS)",
              file=sys.stderr)
        return 2
    home = flwr_home(args.flwr_home)
    conns = {SIM_CONNECTION: local_connection(num_supernodes=args.num_supernodes, cpus_per_tenant=args.cpus_per_tenant,
                                              gpus_per_tenant=args.gpus_per_tenant)}
    if args.superlink:
        conns[CONNECTION] = superlink_connection(args.superlink, args.ca)
    path = merge_connections(home, conns, default=args.default or SIM_CONNECTION, make_default=bool(args.default))
    env = write_env_file(home)
    links = read_config(path)["superlink"]
    print(f"Flower config: {path} (default connection: {links.get('default')})")
    for name in conns:
        print(f"  {name:12} {links[name]['address']}")
    app = shlex.quote(str(app_dir()))
    steps = [f"source {shlex.quote(str(env))}", f"flwr run {app} {SIM_CONNECTION} --stream",
             *([f"flwr run {app} {CONNECTION} --stream"] if args.superlink else []),
             f"flwr ls {SIM_CONNECTION}", f"flwr log RUN_ID {SIM_CONNECTION} --show",
             f"flwr stop RUN_ID {SIM_CONNECTION}"]
    print(f"offline switches: {env}\nFlower app: {app} (the installed fedlora's apps and default run config)\n\n"
          "then:\n" + "\n".join(f"  {s}" for s in steps))
    return 0
