"""`server-ingest images list|show|retry|discard|export`: what an administrator does about
images the ingest could not store (docs/operations.md is the runbook).

Reads (`list`, `show`, `export`) open the ledger and staging read-only beside the running
service (SQLite WAL readers never block its writer). Changes (`retry`, `discard`) go through
the running ingest's control socket (`control.py`): its core applies them in order with
everything else, so no second writer ever touches the ledger. When no ingest runs, they
refuse and say so. Run as root, the command first becomes the owner of the data directory,
so nothing it opens is left owned by root for the service to trip over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from server_ingest.control import Answer, Request, ask
from server_ingest.ledger.base import Ledger
from server_ingest.ledger.choice import open_ledger
from server_ingest.ledger.records import ImageKey, StoredImage
from server_ingest.settings import IngestSettings
from server_ingest.staging import Staging
from tilebridge_protocol.status import ImagePhase
from tilebridge_runtime.durable import is_locked
from tilebridge_storage.archive import ArchiveBackend


class CommandError(Exception):
    """What the admin did not get, said plainly (exit status 1)."""


def add_parser(commands: Any) -> None:
    images = commands.add_parser(
        "images", help="list, inspect, retry, discard or export images the ingest holds"
    )
    actions = images.add_subparsers(dest="action", required=True)
    p = actions.add_parser("list", help="images in the ledger, newest first")
    p.add_argument(
        "--state",
        action="append",
        choices=[phase.value for phase in ImagePhase],
        help="only images in this phase (repeatable); default: every phase",
    )
    p.add_argument("--device")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p = actions.add_parser("show", help="one image: phase, reason, locations, staged tiles")
    p.add_argument("image", help="DEVICE/IMAGE_ID, or IMAGE_ID when only one device used it")
    p.add_argument("--json", action="store_true")
    p = actions.add_parser("retry", help="store a failed image again from its staged tiles")
    p.add_argument("image")
    p.add_argument("--wait", type=float, default=0.0, help="wait this long for the outcome (s)")
    p = actions.add_parser("discard", help="drop an image and free its staged tiles")
    p.add_argument("image")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--reason", default="", help="said to the device and kept in the ledger")
    p = actions.add_parser("export", help="write an image's staged tiles to a folder")
    p.add_argument("image")
    p.add_argument("folder", type=Path)


def main(args: argparse.Namespace, settings: IngestSettings) -> int:
    become_owner(settings.data_dir)
    try:
        if args.action == "list":
            print(list_images(settings, args.state or [], args.device, args.limit, args.json))
        elif args.action == "show":
            print(show(settings, args.image, args.json))
        elif args.action == "retry":
            print(retry(settings, args.image, args.wait))
        elif args.action == "discard":
            print(discard(settings, args.image, args.yes, args.reason))
        else:
            print(export(settings, args.image, args.folder))
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def become_owner(data_dir: Path) -> None:
    """As root, take the uid/gid of the data directory's owner (the service user)."""
    if os.geteuid() != 0 or not data_dir.exists():
        return
    owner = data_dir.stat()
    if owner.st_uid == 0:
        return
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)


# -- reading --------------------------------------------------------------------------------


class _Reading:
    """The configured ledger (SQLite here, or the shared PostgreSQL one), for reads."""

    def __init__(self, settings: IngestSettings) -> None:
        if settings.ledger.kind == "sqlite" and not settings.ledger_path.exists():
            raise CommandError(f"no ledger at {settings.ledger_path} (has the ingest ever run?)")
        self._chosen = open_ledger(settings)

    def __enter__(self) -> Ledger:
        return self._chosen.ledger

    def __exit__(self, *_: object) -> None:
        self._chosen.close()


def staged_bytes(settings: IngestSettings, key: ImageKey) -> int:
    folder = Staging.folder(settings.staging_dir, key.device, key.image_id)
    return sum(p.stat().st_size for p in folder.glob("*.tile")) if folder.is_dir() else 0


def find(settings: IngestSettings, ident: str) -> StoredImage:
    """The image named `DEVICE/IMAGE_ID` (or a bare IMAGE_ID used by one device only)."""
    device, _, rest = ident.rpartition("/")
    try:
        image_id = UUID(rest)
    except ValueError:
        raise CommandError(f"{ident!r} is not DEVICE/IMAGE_ID") from None
    with _Reading(settings) as ledger:
        if device:
            found = ledger.lookup([ImageKey(device, image_id)])
            if not found:
                raise CommandError(f"no image {ident} in the ledger")
            return next(iter(found.values()))
        matches = [i for i in ledger.images(limit=1_000_000) if i.key.image_id == image_id]
    if not matches:
        raise CommandError(f"no image {image_id} in the ledger")
    if len(matches) > 1:
        names = ", ".join(str(m.key) for m in matches)
        raise CommandError(f"{image_id} was used by several devices ({names}): name one")
    return find(settings, str(matches[0].key))


def _row(settings: IngestSettings, image: StoredImage) -> dict[str, Any]:
    m = image.manifest
    return {
        "image": str(image.key),
        "phase": image.phase.value,
        "name": m.image_name if m else None,
        "experiment": m.experiment if m else None,
        "tiles": m.tile_count if m else None,
        "updated": datetime.fromtimestamp(image.updated, UTC).isoformat(timespec="seconds"),
        "reason": image.reason.value if image.reason else None,
        "detail": image.detail,
        "staged_bytes": staged_bytes(settings, image.key),
        "locations": dict(image.locations),
        "digests": dict(image.digests),
        "command": next_step(image),
    }


def next_step(image: StoredImage) -> str | None:
    """The command an administrator runs next for this image (None: nothing to do)."""
    if image.phase is ImagePhase.FAILED:
        return f"fix the cause, then: server-ingest images retry {image.key}"
    if image.phase is ImagePhase.EXPIRED:
        return f"resend from the microscope, or: server-ingest images discard {image.key}"
    return None


def list_images(
    settings: IngestSettings, states: list[str], device: str | None, limit: int, as_json: bool
) -> str:
    with _Reading(settings) as ledger:
        found = ledger.images([ImagePhase(s) for s in states], device, limit)
    rows = [_row(settings, image) for image in found]
    if as_json:
        return json.dumps(rows, indent=2)
    if not rows:
        return "no images"
    return "\n".join(
        f"{r['image']}  {r['phase']:<9} {r['name'] or '-'}  {r['updated']}  "
        f"{_size(r['staged_bytes'])} staged"
        + (f"  {r['reason']}: {r['detail']}" if r["reason"] else "")
        for r in rows
    )


def show(settings: IngestSettings, ident: str, as_json: bool) -> str:
    row = _row(settings, find(settings, ident))
    if as_json:
        return json.dumps(row, indent=2)
    return "\n".join(f"{k:>13}: {v}" for k, v in row.items() if v not in (None, {}, ""))


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):  # noqa: B007 - the last one is kept
        if value < 1024:
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


# -- changing (through the running ingest) --------------------------------------------------


def _through_ingest(settings: IngestSettings, request: Request) -> Answer:
    answer = ask(settings.control_path, request)
    if answer is None:
        held = is_locked(settings.lock_path)
        raise CommandError(
            "the ingest holds the ledger but does not answer on "
            f"{settings.control_path}: is it an older version? restart it"
            if held
            else "the ingest is not running: start it (sudo systemctl start "
            "tilebridge-ingest); retry and discard are carried out by the running ingest"
        )
    if not answer.ok:
        raise CommandError(answer.message)
    return answer


def retry(settings: IngestSettings, ident: str, wait_s: float) -> str:
    image = find(settings, ident)
    if image.phase is not ImagePhase.FAILED:
        raise CommandError(f"image {image.key} is {image.phase.value}: only failed ones retry")
    answer = _through_ingest(
        settings, Request(op="retry", device=image.key.device, image_id=image.key.image_id)
    )
    lines = [answer.message]
    deadline = time.monotonic() + wait_s
    while wait_s and time.monotonic() < deadline:
        now = find(settings, str(image.key))
        # `updated` moves once the retry itself is durable; the outcome comes after it.
        if now.updated > image.updated and now.phase in (ImagePhase.COMPLETE, ImagePhase.FAILED):
            if now.phase is ImagePhase.FAILED:
                raise CommandError(f"image {image.key} failed again: {now.reason}: {now.detail}")
            lines.append(f"image {image.key} complete: {dict(now.locations)}")
            return "\n".join(lines)
        time.sleep(0.2)
    if wait_s:
        raise CommandError(f"image {image.key} not finished after {wait_s:g} s ({answer.phase})")
    lines.append(f"follow it with: server-ingest images show {image.key}")
    return "\n".join(lines)


def discard(settings: IngestSettings, ident: str, yes: bool, reason: str) -> str:
    image = find(settings, ident)
    freed = staged_bytes(settings, image.key)
    if not yes:
        print(
            f"discard {image.key} ({image.phase.value}, {_size(freed)} staged)? The staged "
            "tiles are deleted and the microscope is told to set the image aside. "
            "Type the image id to confirm: ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        if sys.stdin.readline().strip() not in (str(image.key.image_id), str(image.key)):
            raise CommandError("not confirmed: nothing discarded")
    detail = "discarded by an administrator" + (f": {reason}" if reason else "")
    answer = _through_ingest(
        settings,
        Request(op="discard", device=image.key.device, image_id=image.key.image_id, detail=detail),
    )
    folder = Staging.folder(settings.staging_dir, image.key.device, image.key.image_id)
    deadline = time.monotonic() + 30
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # removed once the discard is durable in the ledger
    left = " (the staging folder is still being removed)" if folder.exists() else ""
    return f"{answer.message}; freed {_size(freed)}{left}"


def clear_device_status(settings: IngestSettings, device: str) -> str:
    """For `device remove`: the running ingest clears the device's retained status."""
    answer = ask(settings.control_path, Request(op="clear_device_status", device=device))
    if answer is None:
        return (
            "the ingest is not running here: the device's last retained status stays on the "
            "dashboard (as offline once it is stale) until the ingest clears it"
        )
    return answer.message


# -- export ---------------------------------------------------------------------------------


def export(settings: IngestSettings, ident: str, folder: Path) -> str:
    """The staged tiles of an image as the archive writes them (one OME-TIFF), or, while
    tiles are missing, the raw `.tile` files with the manifest to read them by."""
    image = find(settings, ident)
    m, key = image.manifest, image.key
    source = Staging.folder(settings.staging_dir, key.device, key.image_id)
    if m is None or not source.is_dir():
        raise CommandError(f"image {key} has no staged tiles ({image.phase.value})")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(m.model_dump_json(indent=2))
    if image.close is not None:
        (folder / "close.json").write_text(image.close.model_dump_json(indent=2))
    staging = Staging(settings.staging_dir, create=False)
    present = [k for k in m.tile_keys() if staging.tile_path(key.device, key.image_id, k).exists()]
    if len(present) < m.tile_count:
        tiles = folder / "tiles"
        tiles.mkdir(exist_ok=True)
        for k in present:
            shutil.copyfile(
                staging.tile_path(key.device, key.image_id, k), tiles / f"{k.slug()}.tile"
            )
        return (
            f"{len(present)} of {m.tile_count} tiles staged: copied raw to {tiles} "
            f"(little-endian {m.dtype.value}, {m.tile_height}x{m.tile_width}; manifest.json)"
        )
    writer = ArchiveBackend(folder, name="export").open_image(key.device, m)
    for k in present:
        writer.write_tile(k, staging.load(key.device, m, k))
    if image.close is not None:
        writer.add_planes(image.close.planes())
    stored = writer.finish()
    return f"exported {m.tile_count} tiles of {key} to {stored.location}"
