"""The verdict never calls a tile lost that still exists (buffered, staged) and never misses
one that is gone, corrupted or stored twice. Real files in the layouts the programs write
(a real archive written by the archive backend), and OMERO images as the stand-in's control
API describes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devtools.chaos.microscope import ScanRecord, expected_manifest, synthetic
from devtools.chaos.plan import ScanStep, make_plan
from devtools.chaos.verify import Fate, ImageVerdict, omero_images_of, verify_scan
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage.archive import ArchiveBackend
from tilebridge_storage.mosaic import assemble
from tilebridge_storage.omero_backend.provenance import PROVENANCE_NS, image_description

Frames = dict[TileKey, np.ndarray[Any, Any]]


def a_step(device: str) -> ScanStep:
    plan = make_plan(4, 1, 40)
    return next(
        s
        for s in plan.scans
        if s.device == device and s.columns * s.rows >= 2 and s.tile_count >= 4
    )


class FakeStandin:
    """The stand-in's answers: images (as GET /images) and their pixels."""

    def __init__(self) -> None:
        self.images: list[dict[str, Any]] = []
        self.data: dict[int, np.ndarray[Any, Any]] = {}

    def add(self, manifest: OpenManifest, pixels: Any, position: int | None = None,
            state: str = "complete", datasets: tuple[int, ...] = (1,)) -> int:  # fmt: skip
        image_id = len(self.images) + 1
        marks = {"image_id": str(manifest.image_id)}
        if position is not None:
            marks["position"] = str(position)
        self.images.append(
            {"id": image_id, "name": "x", "description": image_description(manifest.image_id),
             "datasets": list(datasets), "state": state, "shape": list(pixels.shape),
             "dtype": "uint16", "map_annotations": {PROVENANCE_NS: marks}}
        )  # fmt: skip
        self.data[image_id] = pixels
        return image_id

    def pixels(self, image_id: int) -> np.ndarray[Any, Any]:
        return self.data[image_id].copy()


def mosaic_pixels(manifest: OpenManifest, frames: Frames) -> np.ndarray[Any, Any]:
    m = manifest
    planes = [
        assemble(m, {k.index: f for k, f in frames.items() if (k.z, k.c, k.t) == (z, c, t)})
        for t in range(m.size_t)
        for c in range(m.size_c)
        for z in range(m.size_z)
    ]
    return np.stack(planes).reshape(m.size_t, m.size_c, m.size_z, *planes[0].shape)


def tile_pixels(manifest: OpenManifest, frames: Frames, index: int) -> np.ndarray[Any, Any]:
    m = manifest
    planes = [frames[TileKey(index, z, c, t)] for t in range(m.size_t) for c in range(m.size_c)
              for z in range(m.size_z)]  # fmt: skip
    return np.stack(planes).reshape(m.size_t, m.size_c, m.size_z, *planes[0].shape)


class Scene:
    """One acquired scan and the disks it may be on: spool, ingest data dir, OMERO."""

    def __init__(self, tmp_path: Path, layout: str) -> None:
        device = "scope-a" if layout == "mosaic" else "scope-b"
        self.step = a_step(device)
        self.manifest = expected_manifest(self.step, layout)
        self.frames = {k: synthetic(self.step).frame(k) for k in self.manifest.tile_keys()}
        self.record = ScanRecord(self.step, self.manifest, started_at=0.0, acquired_at=1.0)
        self.record.answered = set(self.frames)
        self.spool, self.data = tmp_path / "spool", tmp_path / "data"
        self.standin = FakeStandin()
        self.device = device

    @property
    def keys(self) -> list[TileKey]:
        return self.manifest.tile_keys()

    def archive(self, frames: Frames | None = None, copies: int = 1) -> None:
        frames = frames or self.frames
        for n in range(copies):
            manifest = self.manifest
            if n:  # a second file under another experiment folder
                manifest = manifest.model_copy(update={"experiment": f"again-{n}"})
            writer = ArchiveBackend(self.data / "archive").open_image(self.device, manifest)
            for key, frame in frames.items():
                writer.write_tile(key, frame)
            writer.finish()

    def omero(self, frames: Frames | None = None, **kwargs: Any) -> None:
        frames = frames or self.frames
        if self.manifest.layout.value == "mosaic":
            self.standin.add(self.manifest, mosaic_pixels(self.manifest, frames), **kwargs)
        else:
            for p in self.manifest.positions:
                self.standin.add(self.manifest, tile_pixels(self.manifest, frames, p.index),
                                 position=p.index, **kwargs)  # fmt: skip

    def put(self, where: str, key: TileKey, frame: np.ndarray[Any, Any] | None = None) -> None:
        folder = {
            "buffered": self.spool / "tiles" / str(self.step.image_id),
            "set aside": self.spool / "rejected" / str(self.step.image_id),
            "staged": self.data / "staging" / self.device / str(self.step.image_id),
        }[where]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = self.frames[key] if frame is None else frame
        (folder / f"{key.slug()}.tile").write_bytes(pixels.astype("<u2").tobytes())

    def verdict(self, drained: bool = True) -> ImageVerdict:
        mine = omero_images_of(self.standin.images, self.step.image_id)
        return verify_scan(
            self.record, spool=self.spool, data_dir=self.data, omero_images=mine,
            standin=self.standin, drained=drained, final="complete",
        )  # fmt: skip


def broken(frame: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    out = frame.copy()
    out[3, 5] ^= 1
    return out


@pytest.fixture(params=["mosaic", "per_tile"])
def scene(request: pytest.FixtureRequest, tmp_path: Path) -> Scene:
    return Scene(tmp_path, request.param)


def test_a_scan_stored_exactly_once_everywhere_is_complete(scene: Scene) -> None:
    scene.archive()
    scene.omero()
    verdict = scene.verdict()
    assert verdict.complete, verdict.problems
    assert verdict.counts == {Fate.DELIVERED: len(scene.keys)}


def test_one_flipped_bit_in_the_archive_is_one_corrupted_tile(scene: Scene) -> None:
    key = scene.keys[-1]
    scene.archive({**scene.frames, key: broken(scene.frames[key])})
    scene.omero()
    verdict = scene.verdict()
    assert verdict.corrupted == {key} and not verdict.complete
    assert verdict.fates[key] is Fate.PARTLY_STORED


def test_one_flipped_bit_in_omero_is_that_tile_only(scene: Scene) -> None:
    key = scene.keys[1]
    scene.archive()
    scene.omero({**scene.frames, key: broken(scene.frames[key])})
    verdict = scene.verdict()
    assert verdict.corrupted == {key}
    assert verdict.counts[Fate.DELIVERED] == len(scene.keys) - 1


def test_tiles_still_on_their_way_are_buffered_or_staged_never_lost(scene: Scene) -> None:
    first, second, third = scene.keys[:3]
    scene.put("buffered", first)
    scene.put("staged", second)
    scene.put("set aside", third)
    verdict = scene.verdict(drained=False)
    assert verdict.fates[first] is Fate.BUFFERED
    assert verdict.fates[second] is Fate.STAGED
    assert verdict.fates[third] is Fate.SET_ASIDE
    assert verdict.counts[Fate.LOST] == len(scene.keys) - 3
    assert not verdict.corrupted and not verdict.complete


def test_a_staged_tile_with_other_bytes_is_corrupted(scene: Scene) -> None:
    key = scene.keys[0]
    scene.put("staged", key, broken(scene.frames[key]))
    verdict = scene.verdict(drained=False)
    assert verdict.corrupted == {key}
    assert any("staged tile" in p for p in verdict.problems)


def test_an_image_stored_twice_counts_its_tiles_duplicated(scene: Scene) -> None:
    scene.archive(copies=2)
    scene.omero()
    scene.omero()
    verdict = scene.verdict()
    assert verdict.duplicated == 2 * len(scene.keys)
    assert not verdict.complete and len(verdict.problems) >= 2


def test_a_broken_leftover_omero_image_makes_the_image_incomplete(scene: Scene) -> None:
    scene.archive()
    scene.omero()
    scene.omero(state="broken")
    verdict = scene.verdict()
    assert verdict.counts == {Fate.DELIVERED: len(scene.keys)}
    assert not verdict.complete and any("is broken" in p for p in verdict.problems)


def test_an_unlinked_omero_image_is_not_delivered(scene: Scene) -> None:
    scene.archive()
    scene.omero(datasets=())
    verdict = scene.verdict()
    assert verdict.counts == {Fate.PARTLY_STORED: len(scene.keys)}


def test_frames_never_answered_are_not_acquired_and_an_undrained_image_is_incomplete(
    scene: Scene,
) -> None:
    scene.archive()
    scene.omero()
    key = scene.keys[-1]
    scene.record.answered.discard(key)
    scene.record.acquired_at = None
    verdict = scene.verdict()
    assert verdict.fates[key] is Fate.NOT_ACQUIRED and not verdict.complete
    scene.record.answered.add(key)
    scene.record.acquired_at = 1.0
    assert scene.verdict().complete
    assert not scene.verdict(drained=False).complete


def test_images_of_other_scans_are_not_taken_for_this_one(scene: Scene) -> None:
    stranger = expected_manifest(make_plan(99, 1, 40).scans[3], scene.manifest.layout.value)
    scene.standin.add(stranger, np.zeros((1, 1, 1, 4, 4), np.uint16))
    assert omero_images_of(scene.standin.images, scene.step.image_id) == []
    scene.archive()
    scene.omero()
    assert scene.verdict().complete


def test_an_omero_image_with_unwritten_tiles_is_named(scene: Scene) -> None:
    key = scene.keys[0]
    scene.archive()
    scene.omero({**scene.frames, key: np.zeros_like(scene.frames[key])})
    verdict = scene.verdict()
    assert verdict.fates[key] is Fate.PARTLY_STORED and key not in verdict.corrupted
    assert any("lacks 1 of" in p for p in verdict.problems)


def test_a_partial_second_copy_duplicates_only_the_tiles_it_holds(scene: Scene) -> None:
    key = scene.keys[0]
    scene.archive()
    scene.omero()
    scene.omero({k: f if k == key else np.zeros_like(f) for k, f in scene.frames.items()})
    verdict = scene.verdict()
    assert verdict.duplicated == 1
    assert verdict.counts == {Fate.DELIVERED: len(scene.keys)} and not verdict.corrupted
    assert not verdict.complete and any("second image" in p for p in verdict.problems)
