"""docs/deploy.md, sections 1 and 2, as far as they run without root and systemd.

The same commands and files an administrator uses, in a temporary directory instead of /etc:
identities made with `server-ingest device add` into a password file next to the repository's
ACL, a real Mosquitto with those files, the ingest and the dashboard started the way their
units start them (the example configurations, the broker password handed over through the
credential variable of the unit), and a simulated microscope with the config `device add`
wrote for it.
"""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from devtools.broker import Mosquitto, free_port
from devtools.stack import Program, wait_for
from tilebridge_protocol.topics import DeviceTopic, device_topic

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DEVICE = "scope-1"


def server_ingest(*args: str | Path) -> None:
    command = [sys.executable, "-m", "server_ingest", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr


def add_identity(name: str, role: str, broker_dir: Path, out: Path, *extra: str) -> Path:
    """What install-server.sh (services) and section 2.1 (a microscope) run."""
    server_ingest(
        "device",
        "add",
        name,
        "--role",
        role,
        "--out",
        out,
        "--password-file",
        broker_dir / "passwd",
        "--acl",
        broker_dir / "acl",
        "--pid-file",
        broker_dir / "no.pid",
        "--hide-password",
        *extra,
    )
    return out / "mqtt-password"


def credential_environment(unit: str, credential: Path, run_dir: Path) -> tuple[str, str]:
    """What systemd does with the unit's LoadCredential= and Environment= lines."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / unit)
    service = parser["Service"]
    name, _source = service["LoadCredential"].split(":", 1)
    run_dir.mkdir(mode=0o700)
    shutil.copyfile(credential, run_dir / name)
    variable, value = service["Environment"].split("=", 1)
    return variable, value.replace("%d", str(run_dir))


def example(name: str, **changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((DEPLOY / name).read_text())
    broker = changes.pop("broker", {})
    config["broker"].update(broker)
    config.update(changes)
    return config


def test_server_install_accepts_a_simulated_microscope(tmp_path: Path, monkeypatch: Any) -> None:
    # 1.1: the broker's files, as install-server.sh lays them out in /etc/mosquitto/tilebridge.
    broker_dir = tmp_path / "mosquitto-tilebridge"
    broker_dir.mkdir()
    shutil.copyfile(REPO / "mosquitto" / "acl", broker_dir / "acl")
    (broker_dir / "passwd").touch(mode=0o640)
    ids = tmp_path / "identities"
    ingest_password = add_identity("ingest", "ingest", broker_dir, ids / "ingest")
    monitor_password = add_identity("monitor", "monitor", broker_dir, ids / "monitor")
    # 2.1: the microscope's identity; its directory stands for /etc/tilebridge-edge on the Pi.
    port = free_port()
    pi_dir = ids / DEVICE
    add_identity(
        DEVICE,
        "device",
        broker_dir,
        pi_dir,
        "--no-tls",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--edge-dir",
        str(pi_dir),
    )

    broker = Mosquitto(
        tmp_path / "broker",
        port=port,
        anonymous=False,
        extra_config=f"password_file {broker_dir / 'passwd'}\nacl_file {broker_dir / 'acl'}",
    )
    with broker:
        # 1.3 and 1.4: the services as their units run them.
        for unit, password in (
            ("tilebridge-ingest.service", ingest_password),
            ("tilebridge-dashboard.service", monitor_password),
        ):
            variable, path = credential_environment(unit, password, tmp_path / f"cred-{unit}")
            monkeypatch.setenv(variable, path)
        metrics_port, dashboard_port = free_port(), free_port()
        ingest = Program(
            "server_ingest",
            example(
                "ingest.example.json",
                broker={"port": port},
                data_dir=str(tmp_path / "ingest"),
                archive_dir=str(tmp_path / "archive"),
                metrics_port=metrics_port,
                status_interval_s=1,
            ),
            tmp_path / "programs",
            "ingest",
        ).start("run")
        dashboard = Program(
            "server_ingest",
            example(
                "dashboard.example.json",
                broker={"port": port},
                listen_port=dashboard_port,
            ),
            tmp_path / "programs",
            "dashboard",
        ).start("dashboard")
        try:
            url = f"http://127.0.0.1:{dashboard_port}"
            wait_for(lambda: healthy(url), 30, "the dashboard connected to the broker")
            wait_for(lambda: entry(url, "ingest", "ingest-1", "online"), 30, "the ingest online")

            # 2.3: a test scan from the microscope, with the config `device add` wrote.
            config = json.loads((pi_dir / "config.json").read_text())
            assert config["broker"]["password_file"] == str(pi_dir / "mqtt-password")
            config.update(spool_dir=str(tmp_path / "spool"), min_free_bytes=0)
            scan = Program("edge_agent", config, tmp_path / "programs", DEVICE)
            scan.start(
                "simulate",
                "--columns",
                "2",
                "--rows",
                "2",
                "--tile-size",
                "256",
                "--timeout",
                "60",
                "--summary",
                str(tmp_path / "summary.json"),
            )
            assert scan.wait(120) == 0, scan.log_tail()
            summary = json.loads((tmp_path / "summary.json").read_text())
            assert summary["state"] == "complete"
            assert Path(summary["locations"]["archive"]).is_relative_to(tmp_path / "archive")

            # The dashboard saw the microscope and its image; the ingest counted the tiles.
            wait_for(lambda: entry(url, "device", DEVICE), 30, "the microscope on the dashboard")
            image = wait_for(
                lambda: entry(url, "image", f"{DEVICE}/{summary['image_id']}", "complete"),
                30,
                "the image stored on the dashboard",
            )
            assert image["status"]["tiles_stored"] == 4
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            assert 'tilebridge_ingest_tiles_committed_total{instance="ingest-1"} 4.0' in metrics

            # The dashboard's identity reads status and may publish nothing.
            assert monitor_publish(port, monitor_password.read_text().strip()) == "Not authorized"
        finally:
            for program in (dashboard, ingest):
                proc = program.proc
                program.stop()
                assert proc is not None and proc.returncode == 0, program.log_tail()


def healthy(url: str) -> bool:
    try:
        return bool(httpx.get(f"{url}/healthz", timeout=5).json()["monitor"]["connected"])
    except httpx.HTTPError:
        return False


def entry(
    url: str, kind: str, key: str, phase_or_state: str | None = None
) -> dict[str, Any] | None:
    for item in httpx.get(f"{url}/api/state", timeout=5).json()["entries"]:
        status = item["status"]
        wanted = phase_or_state in (None, status.get("phase"), status.get("state"))
        if item["kind"] == kind and item["key"] == key and wanted:
            return dict(item)
    return None


def monitor_publish(port: int, password: str) -> str:
    """The PUBACK reason the broker gives the `monitor` identity for a forged device status."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set("monitor", password)
    reasons: list[ReasonCode] = []
    client.on_publish = lambda _c, _u, _mid, reason, _p: reasons.append(reason)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(device_topic(DEVICE, DeviceTopic.STATUS), b"{}", qos=1, retain=True)
        info.wait_for_publish(timeout=10)
        wait_for(lambda: reasons, 10, "the PUBACK")
    finally:
        client.disconnect()
        client.loop_stop()
        client._reset_sockets()  # see tests/dashboard/stack.py: release()
    return str(reasons[0])
