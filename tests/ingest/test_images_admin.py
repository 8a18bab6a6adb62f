"""Issue 13, "a failed image cannot be recovered": the archive folder made unwritable fails
the image with its path; the operator fixes the folder and `server-ingest images retry`
completes it through the running ingest; a resend from the microscope does the same;
`images discard` frees the disk; nothing changes while no ingest runs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server_ingest.__main__ import main
from server_ingest.control import ControlServer
from tests.ingest.harness import DEVICE, Harness, tiles_for
from tests.ingest.test_faults import archived
from tilebridge_protocol.messages import ImageAck, ImageState, ManifestState, OpenAck
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_storage.testing.manifests import make_manifest


def break_(folder: Path) -> None:
    """The folder refuses new entries, for root too (the suite runs as root, which ignores
    file modes: the immutable attribute stops it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)


def fix(folder: Path) -> None:
    if not folder.exists():
        return
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o750)


class Ingest:
    """The engine with its control socket, and `server-ingest` run as an admin would."""

    def __init__(self, root: Path) -> None:
        self.harness = Harness(root)
        settings = self.harness.settings
        self.cleared: list[str] = []
        self.control = ControlServer(
            settings.control_path, self.harness.engine.inbox.post, self.cleared.append
        ).start()
        self.config = root / "ingest.json"
        self.config.write_text(json.dumps({"data_dir": str(root)}))

    def admin(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        code = main(["--config", str(self.config), "images", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    def close(self) -> None:
        self.control.stop()
        self.harness.close()


@pytest.fixture
def ingest(tmp_path: Path) -> Iterator[Ingest]:
    running = Ingest(tmp_path)
    yield running
    running.close()
    fix(tmp_path / "archive")


def fail_in_the_archive(ingest: Ingest) -> tuple[Any, Any, ImageAck]:
    harness = ingest.harness
    manifest = make_manifest(rows=1, columns=2)
    tiles = tiles_for(manifest)
    break_(harness.root / "archive")
    harness.scan(manifest, tiles)
    return manifest, tiles, harness.recorder.wait_image_ack(manifest.image_id)


def wait_for_ack(harness: Harness, manifest: Any, state: ImageState) -> ImageAck:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        acks = [a for a in image_acks(harness, manifest) if a.state is state]
        if acks:
            return acks[-1]
        time.sleep(0.05)
    raise TimeoutError(f"no {state} ack for {manifest.image_id}")


def image_acks(harness: Harness, manifest: Any) -> list[ImageAck]:
    return [
        a
        for _, a in harness.recorder.acks
        if isinstance(a, ImageAck) and a.image_id == manifest.image_id
    ]


def test_fixed_then_retried_completes_the_image(
    ingest: Ingest, capsys: pytest.CaptureFixture[str]
) -> None:
    harness = ingest.harness
    manifest, tiles, ack = fail_in_the_archive(ingest)
    assert ack.state is ImageState.FAILED and ack.reason is ReasonCode.STORAGE_FAILED
    assert ack.detail and str(harness.root / "archive") in ack.detail  # the path, this time

    ident = f"{DEVICE}/{manifest.image_id}"
    code, out, _ = ingest.admin(capsys, "list", "--state", "failed", "--json")
    assert code == 0
    [row] = json.loads(out)
    assert row["image"] == ident and row["reason"] == "storage_failed"
    assert row["staged_bytes"] == manifest.tile_count * manifest.tile_bytes
    assert row["command"] == f"fix the cause, then: server-ingest images retry {ident}"

    code, _, err = ingest.admin(capsys, "retry", ident, "--wait", "30")  # not fixed yet
    assert code == 1 and "failed again" in err and "Operation not permitted" in err
    fix(harness.root / "archive")
    code, out, err = ingest.admin(capsys, "retry", str(manifest.image_id), "--wait", "30")
    assert code == 0, err
    assert "failed -> storing" in out and "complete" in out
    complete = image_acks(harness, manifest)[-1]
    assert complete.state is ImageState.COMPLETE
    stored = archived(complete.locations["archive"], manifest)
    assert all((stored[k] == v).all() for k, v in tiles.items())
    code, out, _ = ingest.admin(capsys, "show", ident, "--json")
    assert json.loads(out)["phase"] == "complete" and json.loads(out)["staged_bytes"] == 0


def test_a_resend_after_the_fix_completes_the_image(ingest: Ingest) -> None:
    harness = ingest.harness
    manifest, tiles, ack = fail_in_the_archive(ingest)
    assert ack.state is ImageState.FAILED
    fix(harness.root / "archive")
    harness.scan(manifest, tiles)  # the microscope sends the image again, unchanged
    opens = [a for _, a in harness.recorder.acks if isinstance(a, OpenAck)]
    assert opens[-1].state is ManifestState.ACCEPTED  # not "conflict"
    last = wait_for_ack(harness, manifest, ImageState.COMPLETE)
    assert set(last.locations) == {"archive"}
    assert harness.phase(manifest.image_id)[0] == "complete"


def test_discard_frees_the_staged_tiles_and_tells_the_device(
    ingest: Ingest, capsys: pytest.CaptureFixture[str]
) -> None:
    harness = ingest.harness
    manifest, _, _ = fail_in_the_archive(ingest)
    staged = harness.staging.image_dir(DEVICE, manifest.image_id)
    assert len(list(staged.glob("*.tile"))) == manifest.tile_count
    ident = f"{DEVICE}/{manifest.image_id}"
    code, out, err = ingest.admin(capsys, "discard", ident, "--yes", "--reason", "test scan")
    assert code == 0, err
    assert "failed -> discarded" in out and "freed" in out
    assert not staged.exists()
    refusal = [a for _, a in harness.recorder.acks if isinstance(a, OpenAck)][-1]
    assert refusal.state is ManifestState.REJECTED and refusal.reason is ReasonCode.NOT_PERMITTED
    assert refusal.detail == "discarded by an administrator: test scan"
    assert harness.phase(manifest.image_id) == (
        "discarded",
        "not_permitted",
        "discarded by an administrator: test scan",
    )


def test_discard_asks_for_the_image_id(
    ingest: Ingest, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    manifest, _, _ = fail_in_the_archive(ingest)
    monkeypatch.setattr("sys.stdin", io.StringIO("yes\n"))
    code, _, err = ingest.admin(capsys, "discard", str(manifest.image_id))
    assert code == 1 and "not confirmed" in err
    assert ingest.harness.phase(manifest.image_id)[0] == "failed"


def test_export_writes_the_staged_tiles_as_an_ome_tiff(
    ingest: Ingest, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifest, tiles, _ = fail_in_the_archive(ingest)
    code, out, err = ingest.admin(capsys, "export", str(manifest.image_id), str(tmp_path / "out"))
    assert code == 0, err
    path = out.strip().rsplit(" to ", 1)[1]
    stored = archived(path, manifest)
    assert all((stored[k] == v).all() for k, v in tiles.items())
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["image_id"] == str(
        manifest.image_id
    )


def test_changes_need_a_running_ingest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ingest = Ingest(tmp_path)
    try:
        manifest, _, _ = fail_in_the_archive(ingest)
    finally:
        ingest.close()
    fix(tmp_path / "archive")
    code, _, err = ingest.admin(capsys, "retry", str(manifest.image_id))
    assert code == 1 and "the ingest is not running" in err
    code, out, _ = ingest.admin(capsys, "list", "--json")  # reading needs no ingest
    assert code == 0 and json.loads(out)[0]["phase"] == "failed"
    assert ingest.harness.phase(manifest.image_id)[0] == "failed"


def test_the_control_socket_is_the_service_users_only(ingest: Ingest) -> None:
    mode = ingest.harness.settings.control_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_a_second_ingest_on_the_same_data_directory_is_refused(ingest: Ingest) -> None:
    from tilebridge_protocol.errors import PermanentError

    with pytest.raises(PermanentError, match="held by another process"):
        Harness(ingest.harness.root)
