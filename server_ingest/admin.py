"""`server-ingest device add|remove|list`: broker identities, one per microscope.

Each device gets its own MQTT username (= its device id) and a random password; the broker's
ACL (`mosquitto/acl`) pins every username to its own topic tree, so the credentials on one Pi
open nothing but that microscope's uploads. The Pi never holds OMERO credentials. Names,
password hashes and the ACL blocks are `server_ingest/identities.py`; Mosquitto reads its
files only at start-up and on SIGHUP: after every change the broker is told to reload when
its pid is known.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from server_ingest.identities import (
    AdminError,
    Role,
    acl_add_user,
    acl_remove_user,
    check_device_name,
    check_name,
    locked,
    lookalike_of,
    new_password,
    read_password_file,
    remove_identity,
    replace_file,
    role_of,
    set_identity,
    write_secret,
)
from server_ingest.images import clear_device_status
from tilebridge_runtime.mqtt import BrokerSettings

BROKER_DIR = Path("/etc/mosquitto/tilebridge")
PASSWORD_FILE = BROKER_DIR / "passwd"
ACL_FILE = BROKER_DIR / "acl"
CERTS_DIR = BROKER_DIR / "certs"
PID_FILE = Path("/run/mosquitto/mosquitto.pid")
EDGE_DIR = Path("/etc/tilebridge-edge")
# In a checkout next to this package; a wheel does not carry it, so the server install puts
# a copy under /opt/tilebridge/scripts.
_MAKE_CERTS_PLACES = (
    Path(__file__).resolve().parents[1] / "scripts" / "make_certs.sh",
    Path("/opt/tilebridge/scripts/make_certs.sh"),
)
MAKE_CERTS = next((p for p in _MAKE_CERTS_PLACES if p.exists()), _MAKE_CERTS_PLACES[0])

PASSWORD_FILE_NAME = "mqtt-password"

# -- certificates and the broker ------------------------------------------------------------


def issue_certificate(name: str, certs_dir: Path, rotate: bool, script: Path) -> tuple[Path, Path]:
    """A client certificate (CN = name) from the lab CA via scripts/make_certs.sh."""
    command = ["bash", str(script), "-o", str(certs_dir), *(["-f"] if rotate else []), name]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AdminError(f"make_certs.sh failed: {result.stderr.strip()}")
    return certs_dir / "devices" / f"{name}.crt", certs_dir / "devices" / f"{name}.key"


def broker_pid(pid: int | None, pid_file: Path | None) -> int | None:
    if pid is not None:
        return pid
    if pid_file is not None and pid_file.exists():
        with contextlib.suppress(ValueError):
            return int(pid_file.read_text().strip())
    return None


def reload_broker(pid: int | None) -> str:
    """SIGHUP makes Mosquitto re-read the password and ACL files; it then disconnects clients
    whose identity is gone. Returns what happened, for the admin."""
    if pid is None:
        return (
            "Mosquitto reads these files only at start-up and on SIGHUP: run "
            "`systemctl reload mosquitto` (or `kill -HUP <pid>`; compose: `docker compose -f "
            "deploy/compose.yaml kill -s HUP mosquitto`) for the change to take effect"
        )
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return f"no process {pid}: reload Mosquitto yourself (SIGHUP)"
    return f"sent SIGHUP to Mosquitto (pid {pid}): it reloads passwords and ACL now"


# -- the commands -------------------------------------------------------------------------------


def edge_config(
    name: str, host: str, port: int, tls: bool, edge_dir: Path, cert: bool
) -> dict[str, Any]:
    """AgentSettings for the Pi: no secret inside, only the path of the password file."""
    broker: dict[str, Any] = {
        "host": host,
        "port": port,
        "username": name,
        "password_file": str(edge_dir / PASSWORD_FILE_NAME),
        "tls": tls,
    }
    if tls:
        broker["ca_file"] = str(edge_dir / "ca.crt")
    if cert:
        broker["cert_file"] = str(edge_dir / f"{name}.crt")
        broker["key_file"] = str(edge_dir / f"{name}.key")
    BrokerSettings.model_validate(broker)  # the snippet must load on the Pi as printed
    return {"device_id": name, "broker": broker}


def add(args: argparse.Namespace) -> int:
    role = Role(args.role)
    name = check_name(args.name, role)
    tls = args.tls if args.tls is not None else role is Role.DEVICE
    # The broker's TLS listener requires a client certificate (mosquitto/mosquitto.conf).
    cert = args.cert if args.cert is not None else tls and role is Role.DEVICE
    cert = cert or args.rotate_cert
    if cert and not tls:
        raise AdminError("--cert needs TLS")
    if cert and not (args.certs_dir / "ca.key").exists():
        raise AdminError(
            f"no lab CA in {args.certs_dir} (scripts/make_certs.sh makes one); with another "
            "CA, pass --no-cert and issue the device certificate (CN = device id) there"
        )
    if cert and not args.make_certs.exists():
        raise AdminError(f"{args.make_certs} not found (pass --make-certs PATH)")
    ca = next((p for p in (args.certs_dir / "ca.crt", args.password_file.parent / "ca.crt")
               if p.exists()), None)  # fmt: skip
    port = args.port or (8883 if tls else 1883)
    host = args.host or (socket.getfqdn() if role is Role.DEVICE else "127.0.0.1")
    out: Path = args.out or Path("tilebridge-identities") / name
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)

    password = new_password()
    write_secret(out / PASSWORD_FILE_NAME, password)
    rotated = set_identity(args.password_file, name, password)
    if role is not Role.DEVICE:
        with locked(args.password_file):
            replace_file(args.acl, acl_add_user(_read(args.acl), name, role))
    if tls and ca is not None:
        shutil.copyfile(ca, out / "ca.crt")
    if cert:
        crt, key = issue_certificate(name, args.certs_dir, args.rotate_cert, args.make_certs)
        shutil.copyfile(crt, out / f"{name}.crt")
        shutil.copyfile(key, out / f"{name}.key")
        os.chmod(out / f"{name}.key", 0o600)

    if role is Role.DEVICE:
        snippet = edge_config(name, host, port, tls, args.edge_dir, cert)
    else:
        snippet = {"broker": edge_config(name, host, port, tls, args.edge_dir, False)["broker"]}
    (out / "config.json").write_text(json.dumps(snippet, indent=2) + "\n")

    say = _stderr
    say(f"{'rotated' if rotated else 'created'} {role} identity {name!r} in {args.password_file}")
    if not args.hide_password:
        say(f"==== NEW MQTT PASSWORD for {name}: shown once, also in {out / PASSWORD_FILE_NAME}")
        say(password)
        say("==== END OF PASSWORD ====")
    say(f"copy {out}/ to the client as {args.edge_dir}/ (keep {PASSWORD_FILE_NAME} mode 600)")
    if tls and ca is None:
        say(f"no CA certificate found: put the broker's CA there as {args.edge_dir}/ca.crt")
    if rotated:
        say("the old password stops working once the broker reloads")
    say(reload_broker(broker_pid(args.pid, args.pid_file)))
    print(json.dumps(snippet, indent=2))
    return 0


def remove(args: argparse.Namespace) -> int:
    # Any valid name, lookalikes too: one made before they were refused must be removable.
    name = check_device_name(args.name)
    if not remove_identity(args.password_file, name):
        raise AdminError(f"no identity {name!r} in {args.password_file}")
    if args.acl.exists():
        with locked(args.password_file):
            replace_file(args.acl, acl_remove_user(_read(args.acl), name))
    _stderr(f"removed {name!r} from {args.password_file}")
    cert = args.certs_dir / "devices" / f"{name}.crt"
    if cert.exists():
        _stderr(
            f"{cert} stays valid for TLS, but the broker also requires the password, so {name} "
            "cannot connect any more"
        )
    _stderr(reload_broker(broker_pid(args.pid, args.pid_file)))
    settings = getattr(args, "settings", None)
    if role_of(name) is Role.DEVICE and settings is not None:
        # Kicked by the reload without its will: its last status would say online forever.
        _stderr(clear_device_status(settings, name))
    return 0


def list_identities(args: argparse.Namespace) -> int:
    for name in sorted(read_password_file(args.password_file)):
        cert = (args.certs_dir / "devices" / f"{name}.crt").exists()
        print(f"{name}\t{role_of(name)}\t{'certificate' if cert else '-'}")
        if role_of(name) is Role.DEVICE and (service := lookalike_of(name)) is not None:
            _stderr(f"warning: device {name!r} looks like the {service} identity: remove it")
    return 0


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def add_parser(commands: Any) -> None:
    """The `device` subcommand of `server-ingest`."""
    device = commands.add_parser("device", help="manage broker identities (one per microscope)")
    actions = device.add_subparsers(dest="action", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--password-file", type=Path, default=PASSWORD_FILE)
        p.add_argument("--acl", type=Path, default=ACL_FILE, help="the broker's acl_file")
        p.add_argument("--certs-dir", type=Path, default=CERTS_DIR, help="lab CA and certs")
        p.add_argument("--pid", type=int, help="Mosquitto's pid: send it SIGHUP to reload")
        p.add_argument("--pid-file", type=Path, default=PID_FILE)

    p_add = actions.add_parser("add", help="create an identity, or rotate its password")
    p_add.add_argument("name", help="the device id (= MQTT username)")
    common(p_add)
    p_add.add_argument("--role", choices=[r.value for r in Role], default=Role.DEVICE.value)
    p_add.add_argument("--out", type=Path, help="where to put the files for the client")
    p_add.add_argument("--edge-dir", type=Path, default=EDGE_DIR, help="their place on the Pi")
    p_add.add_argument("--host", help="broker host name as the client sees it")
    p_add.add_argument("--port", type=int)
    p_add.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None)
    p_add.add_argument(
        "--cert",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="issue a client certificate from the lab CA (default: yes for a TLS device)",
    )
    p_add.add_argument("--rotate-cert", action="store_true", help="issue a new one (new key)")
    p_add.add_argument("--make-certs", type=Path, default=MAKE_CERTS)
    p_add.add_argument("--hide-password", action="store_true", help="only write the file")

    p_remove = actions.add_parser("remove", help="revoke an identity")
    p_remove.add_argument("name")
    common(p_remove)

    p_list = actions.add_parser("list", help="list identities")
    common(p_list)


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "add":
            return add(args)
        if args.action == "remove":
            return remove(args)
        return list_identities(args)
    except (AdminError, OSError) as exc:
        _stderr(f"error: {exc}")
        return 1
