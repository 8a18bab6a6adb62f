"""The verdict on every scan: each tile's fate, pixel for pixel, in the archive and in OMERO.

A tile is *delivered* when the archive and OMERO each hold it exactly once and exactly as
acquired (the simulator regenerates every frame bit for bit). Otherwise it is, in the order
it is looked for: still *buffered* on the edge, *set aside* there (refused by the server),
*staged* on the ingest, *partly stored* (in one backend only and nowhere else), or *lost*
(nowhere). *Corrupted* (stored or staged with other pixels) and *duplicated* (an image
stored twice) are counted on top. Tiles the agent never answered 200 for are *not acquired*.

The places are read upstream first (edge, staging, archive, OMERO): tiles only move
downstream, so a tile in transit is found in one of them, never reported lost.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

import numpy as np
import tifffile

from devtools.chaos import locate
from devtools.chaos.microscope import ScanRecord, synthetic
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import Layout, OpenManifest
from tilebridge_storage.mosaic import Mosaic, plan


class Fate(StrEnum):
    DELIVERED = "delivered"
    BUFFERED = "buffered"
    SET_ASIDE = "set aside"
    STAGED = "staged"
    PARTLY_STORED = "partly stored"
    LOST = "lost"
    NOT_ACQUIRED = "not acquired"


class Copy(StrEnum):
    EXACT = "exact"
    CORRUPT = "corrupt"
    MISSING = "missing"


@dataclass
class ImageVerdict:
    record: ScanRecord
    drained: bool
    final: str | None
    fates: dict[TileKey, Fate] = field(default_factory=dict)
    corrupted: set[TileKey] = field(default_factory=set)
    duplicated: int = 0
    """Tiles stored more than once (extra archive files, extra OMERO images)."""
    problems: list[str] = field(default_factory=list)
    omero_ids: list[int] = field(default_factory=list)
    """Every stand-in image carrying this scan's provenance."""

    @property
    def counts(self) -> Counter[Fate]:
        return Counter(self.fates.values())

    @property
    def complete(self) -> bool:
        return (
            self.record.acquired
            and self.drained
            and all(f is Fate.DELIVERED for f in self.fates.values())
            and not self.corrupted
            and not self.duplicated
            and not self.problems
        )


Frames = dict[TileKey, np.ndarray[Any, Any]]


class PixelSource(Protocol):
    """Reads an OMERO image's pixels (T, C, Z, Y, X): the stand-in's control API."""

    def pixels(self, image_id: int) -> np.ndarray[Any, Any]: ...


def verify_scan(
    record: ScanRecord,
    *,
    spool: Path,
    data_dir: Path,
    omero_images: list[dict[str, Any]],
    standin: PixelSource,
    drained: bool,
    final: str | None,
) -> ImageVerdict:
    """One scan's verdict. `omero_images`: the stand-in's images of this scan."""
    step, manifest = record.step, record.manifest
    frames = {k: synthetic(step).frame(k) for k in manifest.tile_keys()}
    verdict = ImageVerdict(record, drained, final, omero_ids=[i["id"] for i in omero_images])
    # Upstream first: see the module docstring.
    buffered = locate.buffered(spool, manifest.image_id)
    aside = locate.set_aside(spool, manifest.image_id)
    staged = locate.staged(data_dir, step.device, manifest.image_id)
    archive = _archive(verdict, locate.archive_files(data_dir, step.device, manifest), frames)
    omero = _omero(verdict, omero_images, standin, frames)
    for key, frame in frames.items():
        for where, paths in (("buffered", buffered), ("set aside", aside), ("staged", staged)):
            if key in paths and not _same_bytes(paths[key], frame):
                verdict.corrupted.add(key)
                verdict.problems.append(f"{where} tile {tuple(key)} differs from the frame")
        if archive.get(key) is Copy.CORRUPT or omero.get(key) is Copy.CORRUPT:
            verdict.corrupted.add(key)
        in_archive, in_omero = archive.get(key) is Copy.EXACT, omero.get(key) is Copy.EXACT
        if key not in record.answered:
            fate = Fate.NOT_ACQUIRED
        elif in_archive and in_omero:
            fate = Fate.DELIVERED
        elif key in buffered:
            fate = Fate.BUFFERED
        elif key in aside:
            fate = Fate.SET_ASIDE
        elif key in staged:
            fate = Fate.STAGED
        elif in_archive or in_omero:
            fate = Fate.PARTLY_STORED
        else:
            fate = Fate.LOST
        verdict.fates[key] = fate
    return verdict


def _same_bytes(path: Path, frame: np.ndarray[Any, Any]) -> bool:
    try:
        return path.read_bytes() == frame.astype("<u2").tobytes()
    except FileNotFoundError:
        return True  # moved on downstream meanwhile; it is judged there


def _archive(verdict: ImageVerdict, files: list[Path], frames: Frames) -> dict[TileKey, Copy]:
    manifest = verdict.record.manifest
    if not files:
        return {}
    if len(files) > 1:
        verdict.duplicated += manifest.tile_count * (len(files) - 1)
        verdict.problems.append(f"{len(files)} archive files: {[f.name for f in files]}")
    copies: dict[TileKey, Copy] = {}
    shape = (
        manifest.size_t,
        manifest.size_c,
        manifest.size_z,
        manifest.tile_height,
        manifest.tile_width,
    )
    try:
        with tifffile.TiffFile(files[0]) as tif:
            if len(tif.series) != len(manifest.positions):
                verdict.problems.append(
                    f"archive has {len(tif.series)} series for {len(manifest.positions)} positions"
                )
            for position, series in zip(manifest.positions, tif.series, strict=False):
                data = series.asarray().reshape(shape)
                for key in manifest.tile_keys():
                    if key.index == position.index:
                        same = np.array_equal(data[key.t, key.c, key.z], frames[key])
                        copies[key] = Copy.EXACT if same else Copy.CORRUPT
    except (OSError, ValueError) as exc:
        verdict.problems.append(f"archive file unreadable: {exc}")
        return {key: Copy.CORRUPT for key in frames}
    return copies


def _omero(
    verdict: ImageVerdict, images: list[dict[str, Any]], standin: PixelSource, frames: Frames
) -> dict[TileKey, Copy]:
    manifest = verdict.record.manifest
    per_tile = manifest.layout is Layout.PER_TILE
    by_part: dict[int | None, list[dict[str, Any]]] = {}
    for image in images:
        by_part.setdefault(_position(image) if per_tile else None, []).append(image)
    expected_parts = [p.index for p in manifest.positions] if per_tile else [None]
    mosaic = None if per_tile else plan(manifest)
    copies: dict[TileKey, Copy] = {}
    for part in expected_parts:
        candidates = by_part.pop(part, [])
        whole = [i for i in candidates if i["state"] in ("complete", "romio") and i["datasets"]]
        for extra in [i for i in candidates if i not in whole]:
            verdict.problems.append(
                f"OMERO Image:{extra['id']} is {extra['state']}, in datasets {extra['datasets']}"
            )
        if not whole:
            continue
        tiles = [k for k in manifest.tile_keys() if part is None or k.index == part]
        judged = []
        for image in whole:
            pixels = standin.pixels(image["id"])
            judged.append(
                (image, {k: _omero_tile(manifest, mosaic, pixels, k, frames[k]) for k in tiles})
            )
        # The best copy counts; an extra copy holding tiles exactly duplicates them.
        judged.sort(key=lambda pair: sum(c is Copy.EXACT for c in pair[1].values()), reverse=True)
        (best, best_copies), extras = judged[0], judged[1:]
        copies.update(best_copies)
        missing = sum(c is Copy.MISSING for c in best_copies.values())
        if missing:
            verdict.problems.append(
                f"OMERO Image:{best['id']} lacks {missing} of {len(tiles)} tiles (unwritten)"
            )
        for image, extra_copies in extras:
            exact = sum(c is Copy.EXACT for c in extra_copies.values())
            verdict.duplicated += exact
            verdict.corrupted.update(k for k, c in extra_copies.items() if c is Copy.CORRUPT)
            verdict.problems.append(
                f"OMERO Image:{image['id']} is a second image of position {part} "
                f"(besides Image:{best['id']}), holding {exact} of {len(tiles)} tiles"
            )
    for part, strays in by_part.items():
        verdict.problems.append(f"OMERO images {[i['id'] for i in strays]} for unknown part {part}")
    return copies


def _provenance(image: dict[str, Any]) -> dict[str, str]:
    # The backend's own constant; imported late because the module imports omero-py.
    from tilebridge_storage.omero_backend.provenance import PROVENANCE_NS

    marks: dict[str, str] = image["map_annotations"].get(PROVENANCE_NS, {})
    return marks


def _position(image: dict[str, Any]) -> int | None:
    value = _provenance(image).get("position")
    return int(value) if value is not None else None


def _omero_tile(
    manifest: OpenManifest,
    mosaic: Mosaic | None,
    pixels: np.ndarray[Any, Any],
    key: TileKey,
    frame: np.ndarray[Any, Any],
) -> Copy:
    expected_shape = (manifest.size_t, manifest.size_c, manifest.size_z)
    if tuple(pixels.shape[:3]) != expected_shape:
        return Copy.CORRUPT
    plane = pixels[key.t, key.c, key.z]
    if mosaic is None:
        if plane.shape != frame.shape:
            return Copy.CORRUPT
        pairs = [(plane, frame)]
    else:
        if plane.shape != (mosaic.height, mosaic.width):
            return Copy.CORRUPT
        pairs = [
            (plane[p.canvas.slices], frame[p.tile.slices]) for p in mosaic.pieces_of(key.index)
        ]
    if all(np.array_equal(got, want) for got, want in pairs):
        return Copy.EXACT
    if all(not got.any() for got, _ in pairs):
        return Copy.MISSING
    return Copy.CORRUPT


def omero_images_of(images: list[dict[str, Any]], image_id: UUID) -> list[dict[str, Any]]:
    """The stand-in's images that carry a tilebridge image's provenance (either mark)."""
    from tilebridge_storage.omero_backend.provenance import image_description

    description = image_description(image_id)
    return [
        i
        for i in images
        if i["description"] == description or _provenance(i).get("image_id") == str(image_id)
    ]
