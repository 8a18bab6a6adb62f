"""The OMERO storage backend: `OmeroBackend` and its per-image writer.

The ingest opens a writer when an image's `open` manifest is accepted and hands it each tile
as it is committed, so pixels reach OMERO during the acquisition (see `pixels`). A writer
that failed stays failed: the ingest aborts it, waits, opens a new one and feeds every staged
tile again; the new one first deletes what the old one left (see `provenance`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilebridge_protocol.errors import PermanentError, TilebridgeError, TransientError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import Layout, OpenManifest
from tilebridge_storage.base import (
    DigestMismatchError,
    Holdings,
    ImageWriter,
    StorageBackend,
    StoredImage,
)
from tilebridge_storage.omero_backend.errors import omero_errors
from tilebridge_storage.omero_backend.images import (
    create_images,
    describe_holdings,
    describe_planes,
)
from tilebridge_storage.omero_backend.pixels import PixelSink, read_digest
from tilebridge_storage.omero_backend.provenance import (
    delete_images,
    find_images,
    record_digest,
)
from tilebridge_storage.omero_backend.session import OmeroSession, SessionPool
from tilebridge_storage.omero_backend.settings import OmeroSettings
from tilebridge_storage.omero_backend.targets import Target, ensure_target

log = logging.getLogger(__name__)


class OmeroBackend(StorageBackend):
    """docstring inherited"""

    kind = "omero"

    def __init__(self, settings: OmeroSettings, name: str | None = None) -> None:
        super().__init__(name)
        self.settings = settings
        self.pool = SessionPool(settings)
        # Two writers must not both create the same missing project or dataset.
        self._targets = threading.Lock()

    def __repr__(self) -> str:
        return f"OmeroBackend({self.settings.host}:{self.settings.port})"

    def open_image(self, device: str, manifest: OpenManifest) -> ImageWriter:
        policy = self.settings.policy_for(device)
        if manifest.omero_dataset_id is None and manifest.omero_project_id is None:
            policy.check_target(device, manifest.project, manifest.dataset)  # before any login
        session = self.pool.session(self.settings.credentials_for(policy))
        created: list[int] = []
        try:
            with omero_errors(f"opening image {manifest.image_id}"):
                with self._targets:
                    target = ensure_target(session, policy, device, manifest)
                delete_images(session, find_images(session, manifest.image_id))
                images = create_images(session, target, device, manifest, created.append)
        except BaseException:
            _discard(session, created)
            raise
        log.info(
            "image %s: writing to OMERO Image:%s in Dataset:%d",
            manifest.image_id, ",".join(str(i.image_id) for i in images), target.dataset_id,
        )  # fmt: skip
        writer = _OmeroWriter(device, manifest, self.name, session, target, self.settings)
        for image in images:
            writer.provenance.append(image.provenance_id)
            writer.add_sink(
                image.image_id,
                PixelSink(
                    session, image.pixels_id, image.source, image.indices, manifest,
                    writer.tiles, self.settings.max_call_bytes,
                ),
            )  # fmt: skip
        return writer

    def check(self) -> None:
        """A login with the server-wide account (a dead session is replaced)."""
        self.pool.session(self.settings.credentials)

    def close(self) -> None:
        self.pool.close()


class _OmeroWriter(ImageWriter):
    def __init__(
        self,
        device: str,
        manifest: OpenManifest,
        backend: str,
        session: OmeroSession,
        target: Target,
        settings: OmeroSettings,
    ) -> None:
        super().__init__(device, manifest, backend)
        self.session = session
        self.target = target
        self.settings = settings
        self.tiles: dict[TileKey, np.ndarray[Any, Any]] = {}
        """Tiles not yet written (references to the caller's arrays, dropped per plane)."""
        self.sources: dict[TileKey, _Kept] = {}
        """Where every tile came from, to digest small images at the end (see `pixels`)."""
        self.provenance: list[int] = []
        self.received: set[TileKey] = set()
        self.image_ids: list[int] = []
        self.sinks: list[PixelSink] = []
        self._sink_of: dict[int, PixelSink] = {}
        self.failed: TilebridgeError | None = None
        """Why an earlier call of this attempt failed; every later call fails alike."""
        self.aborted = False
        self.measured_saved = False
        self.holdings_saved = False
        self.stored: StoredImage | None = None

    def __repr__(self) -> str:
        return f"_OmeroWriter({self.manifest.image_id}, Image:{self.image_ids})"

    def add_sink(self, image_id: int, sink: PixelSink) -> None:
        self.image_ids.append(image_id)
        self.sinks.append(sink)
        for index in sink.indices:
            self._sink_of[index] = sink

    def write_tile(self, key: TileKey, pixels: np.ndarray[Any, Any]) -> None:
        self._check_open()
        self.check_tile(key, pixels)
        self._check_failed()
        if key in self.received:
            return
        self.received.add(key)
        self.tiles[key] = pixels
        self.sources[key] = _Kept.of(pixels)
        sink = self._sink_of[key.index]
        try:
            with omero_errors(f"writing image {self.manifest.image_id}"):
                sink.offer(key)
                if sink.complete:
                    sink.save()
        except Exception as exc:
            # A store that failed mid-pass cannot go on; only a new attempt can.
            self.failed = _as_tilebridge(exc)
            raise

    def expect(self, holdings: Holdings) -> None:
        """docstring inherited; the bands that waited only for tiles the image does not hold
        are written now, in the same pass."""
        self._check_open()
        super().expect(holdings)
        self._check_failed()
        try:
            with omero_errors(f"writing image {self.manifest.image_id}"):
                for sink in self.sinks:
                    sink.held = self.holds
                    sink.advance()
                    if sink.complete:
                        sink.save()
        except Exception as exc:
            self.failed = _as_tilebridge(exc)
            raise

    def finish(self) -> StoredImage:
        if self.stored is not None:
            return self.stored
        self._check_open()
        self.require_complete(self.received)
        self._check_failed()
        try:
            with omero_errors(f"saving image {self.manifest.image_id}"):
                for sink in self.sinks:
                    if not sink.complete:
                        raise PermanentError(f"OMERO Pixels:{sink.pixels_id} is not complete")
                    sink.save()
                if self.planes and not self.measured_saved:
                    for image_id, sink in zip(self.image_ids, self.sinks, strict=True):
                        describe_planes(
                            self.session, image_id, sink, self.manifest, self.planes, self.holds
                        )
                    self.measured_saved = True
                if self.holdings is not None and not self.holdings_saved:
                    for image_id, sink in zip(self.image_ids, self.sinks, strict=True):
                        describe_holdings(
                            self.session, image_id, sink, self.manifest, self.holdings
                        )
                    self.holdings_saved = True
                digests = self._verify() if self.settings.verify else None
        except Exception as exc:
            self.failed = _as_tilebridge(exc)
            raise
        ids = {
            "image": self.image_ids[0],
            "dataset": self.target.dataset_id,
            "project": self.target.project_id,
        }
        if self.manifest.layout is Layout.PER_TILE:
            for image_id, sink in zip(self.image_ids, self.sinks, strict=True):
                ids[f"image_{sink.indices[0]}"] = image_id
        images = ",".join(str(i) for i in self.image_ids)
        self.stored = StoredImage(
            backend=self.backend_name,
            location=f"omero:Image:{images} dataset:{self.target.dataset_id}",
            ids=ids,
            digest=f"sha1:{','.join(digests)}" if digests else None,
        )
        self.tiles.clear()
        self.sources.clear()
        log.info("image %s stored in OMERO as %s", self.manifest.image_id, self.stored.location)
        return self.stored

    def _verify(self) -> list[str]:
        """Each OMERO image's digest as OMERO computes it, equal to what was written, or
        DigestMismatchError (the images are deleted by the abort that follows)."""
        digests = []
        for image_id, sink, annotation in zip(
            self.image_ids, self.sinks, self.provenance, strict=True
        ):
            meant = sink.digest(lambda key: s.load() if (s := self.sources.get(key)) else None)
            held = read_digest(self.session, sink.pixels_id, self.settings.verify_wait_s)
            if held != meant:
                log.error(
                    "image %s: OMERO Image:%d holds other pixels than written (sha1 %s, "
                    "written %s); it is deleted and written again",
                    self.manifest.image_id, image_id, held, meant,
                )  # fmt: skip
                raise DigestMismatchError(
                    f"OMERO Image:{image_id} holds other pixels than written "
                    f"(its sha1 {held[:12]}…, written {meant[:12]}…)"
                )
            record_digest(self.session, annotation, f"sha1:{held}")
            digests.append(held)
        return digests

    def abort(self) -> None:
        if self.aborted or self.stored is not None:
            return
        self.aborted = True
        for sink in self.sinks:
            sink.close()
        self.tiles.clear()
        self.sources.clear()
        _discard(self.session, self.image_ids)

    def _check_failed(self) -> None:
        if self.failed is not None:
            kind = TransientError if self.failed.retryable else PermanentError
            raise kind(f"an earlier OMERO call of this attempt failed: {self.failed}")

    def _check_open(self) -> None:
        if self.stored is not None:
            raise PermanentError(f"image {self.manifest.image_id} is already finished")
        if self.aborted:
            raise PermanentError(f"this attempt at image {self.manifest.image_id} was aborted")


@dataclass(frozen=True)
class _Kept:
    """A tile as handed in: a staged file's memory map is kept by name (mapped again when
    needed, so thousands of tiles hold no file descriptors), anything else by reference."""

    path: Path | None
    array: np.ndarray[Any, Any] | None
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @classmethod
    def of(cls, pixels: np.ndarray[Any, Any]) -> _Kept:
        filename = getattr(pixels, "filename", None)
        if isinstance(pixels, np.memmap) and filename and pixels.offset == 0:
            return cls(Path(filename), None, pixels.dtype, pixels.shape)
        return cls(None, pixels, pixels.dtype, pixels.shape)

    def load(self) -> np.ndarray[Any, Any]:
        if self.array is not None:
            return self.array
        assert self.path is not None
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)


def _as_tilebridge(exc: Exception) -> TilebridgeError:
    return exc if isinstance(exc, TilebridgeError) else PermanentError(repr(exc))


def _discard(session: OmeroSession, image_ids: list[int]) -> None:
    """Delete a failed attempt's images, if the server lets us now; if not, the next
    attempt finds and deletes them by their provenance."""
    if not image_ids:
        return
    try:
        with omero_errors("deleting a partial image"):
            delete_images(session, image_ids)
    except Exception as exc:
        log.warning("could not delete partial OMERO images %s now: %s", image_ids, exc)
