"""The SuperLink's public face: nginx in front of it, passing only Flower's Fleet API.

Flower 1.42 serves the Control API (start / stop / list runs, register node keys, stream logs),
the Fleet API (what SuperNodes speak) and the ServerApp's Runtime API on **one** HTTPS port,
and Control has no account authentication without an OIDC provider. Anyone who can reach that
port with the CA certificate (every tenant has it) could register node keys, drive runs or claim
the ServerApp's task. So a fedlora SuperLink listens on loopback only (``--internal-port``), and
nginx — a real reverse proxy, not fedlora's code — is what the tenants dial:

* ``/v1/fleet/*`` is proxied to the SuperLink over TLS, the SuperLink's certificate checked
  against the federation's CA; Flower's node authentication (signed request headers) passes
  through untouched, and with it enabled the Fleet API refuses to register new nodes;
* every other path (``/v1/control/*``, ``/v1/runtime/*``, ``/docs``, ``/health``...) gets
  403 from nginx and never reaches the SuperLink;
* request and response bodies stream (no size cap: an adapter delta is tens of MB), with no
  buffering to disk.

The operator reaches Control on loopback (``flwr`` through the ``fedlora`` connection that
``fedlora deploy`` writes) and the ServerApp's executor reaches the Runtime API there with the
SuperExec secret (process isolation), so local users of the SuperLink's host who lack that
secret cannot claim the ServerApp's task either; Control itself is open to them: run the
SuperLink on a host or in a container of its own (``docker/compose.yaml`` does).

nginx is a system package (``apt-get install nginx-light``); :func:`nginx_binary` says how to get
it when it is missing. ``docker/fleet-proxy.conf`` is :func:`main`'s output for the compose
federation (``tests/simulations/test_deploy.py`` keeps the two the same).

    python -m fedlora.simulations.cli.fleet_proxy --upstream superlink:9093 --upstream-name superlink \\
        --certs /certs --prefix /var/lib/fleet-proxy --user "nobody nogroup" > docker/fleet-proxy.conf
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedlora.simulations.cli.launcher import DeploymentConfigError

FLEET_PREFIX = "/v1/fleet/"


def nginx_binary() -> str:
    """The nginx executable, or a :class:`DeploymentConfigError` saying how to install it."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if found is None:
        raise DeploymentConfigError("the SuperLink's public port is served by nginx, which is not installed; "
                                    "install it (Debian/Ubuntu: `apt-get install nginx-light`) and start again")
    return found


def nginx_config(*, prefix: Path, listen: str, upstream: str, server_cert: Path, server_key: Path,
                 ca_cert: Path, upstream_name: str = "localhost", user: str | None = None) -> str:
    """nginx.conf for the proxy: ``listen`` (HOST:PORT, TLS with the SuperLink's certificate)
    passes ``/v1/fleet/`` to ``upstream`` (the SuperLink's loopback HOST:PORT, verified as
    ``upstream_name`` against ``ca_cert``) and refuses everything else with 403. ``user``: the
    workers' user (default: ``nobody nogroup`` when started as root, else the caller's)."""
    if user is None:
        user = f"nobody {_nobody_group()}" if os.geteuid() == 0 else ""
    user = f"user {user};\n" if user else ""  # workers drop root
    return f"""# written by fedlora deploy: the SuperLink's public port passes the Fleet API only
{user}worker_processes 1;
daemon off;
pid {prefix / 'nginx.pid'};
error_log {prefix / 'error.log'} warn;
events {{ worker_connections 512; }}
http {{
    access_log {prefix / 'access.log'};
    client_body_temp_path {prefix / 'tmp' / 'body'};
    proxy_temp_path {prefix / 'tmp' / 'proxy'};
    fastcgi_temp_path {prefix / 'tmp' / 'fastcgi'};
    uwsgi_temp_path {prefix / 'tmp' / 'uwsgi'};
    scgi_temp_path {prefix / 'tmp' / 'scgi'};
    server_tokens off;
    upstream superlink {{ server {upstream}; keepalive 16; }}
    server {{
        listen {listen} ssl;
        ssl_certificate {server_cert};
        ssl_certificate_key {server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 0;
        location {FLEET_PREFIX} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca_cert};
            proxy_ssl_name {upstream_name};
            proxy_ssl_server_name on;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
        location / {{ return 403 "fedlora: only Flower's Fleet API is served on this port\\n"; }}
    }}
}}
"""


def _nobody_group() -> str:
    """The unprivileged group: ``nogroup`` (Debian, Ubuntu) or ``nobody`` (Fedora, Arch...)."""
    import grp

    try:
        grp.getgrnam("nogroup")
        return "nogroup"
    except KeyError:
        return "nobody"


def write_proxy(prefix: Path, **kwargs) -> Path:
    """Write the proxy's config and working folders under ``prefix``; returns the config path."""
    prefix = Path(prefix).resolve()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # nginx's workers run as nobody and write their temp files here
        import pwd

        nobody = pwd.getpwnam("nobody").pw_uid
        for d in [prefix / "tmp", *sorted((prefix / "tmp").iterdir())]:
            os.chown(d, nobody, -1)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(prefix=prefix, **kwargs), encoding="utf-8")
    return conf


def proxy_command(conf: Path) -> list[str]:
    """nginx in the foreground on ``conf`` (its own prefix: no system config is read)."""
    conf = Path(conf).resolve()
    return [nginx_binary(), "-p", str(conf.parent), "-c", str(conf), "-e", str(conf.parent / "error.log")]


def main(argv: list[str] | None = None) -> int:
    """Print the proxy's nginx.conf for a host of its own (``docker/fleet-proxy.conf`` is this)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fedlora.simulations.cli.fleet_proxy", description=main.__doc__)
    p.add_argument("--listen", default="0.0.0.0:9093", help="the tenants' HOST:PORT (default: 0.0.0.0:9093)")
    p.add_argument("--upstream", required=True, help="the SuperLink's HOST:PORT")
    p.add_argument("--upstream-name", required=True, help="the name the SuperLink's certificate is checked for")
    p.add_argument("--certs", required=True, help="directory holding ca.crt, server.crt and server.key there")
    p.add_argument("--prefix", required=True, help="nginx's working directory there (pid, logs, temp files)")
    p.add_argument("--user", default="", help="the workers' user, e.g. 'nobody nogroup' (default: none)")
    args = p.parse_args(argv)
    certs, prefix = Path(args.certs), Path(args.prefix)
    print(nginx_config(prefix=prefix, listen=args.listen, upstream=args.upstream, server_cert=certs / "server.crt",
                       server_key=certs / "server.key", ca_cert=certs / "ca.crt", upstream_name=args.upstream_name,
                       user=args.user), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
