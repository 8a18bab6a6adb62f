"""What the edge agent does not offer yet, done in ImSwitch's process around any `Edge`.

* **Local files where ImSwitch looks.** The agent writes local copies only under its own
  output folder, so the files ImSwitch's UI and live view read (`<base_dir>.ome.zarr`, ...)
  are written here, frame by frame in the caller's thread, with the storage backends the
  agent would use (`tilebridge_storage.registry`). A target that fails (a full disk) is
  reported with its error, its partial output removed, and the others and the server stream
  carry on.
* **Closing an image with holes.** The agent closes an image only when every tile is in; a
  round scan area never fills its grid. Until the agent can close with tiles left out, every
  tile never taken is written as zeros (what ImSwitch's own canvas shows there) to the server
  and the local files, then the image is closed.

When the agent takes local targets and partial closes, the root wires the edge without this.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import numpy as np

from tilebridge_imswitch.port import Edge, LocalTarget, Progress, Target
from tilebridge_protocol.errors import PermanentError, TilebridgeError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest, PlaneMeta
from tilebridge_storage import registry
from tilebridge_storage.base import ImageWriter

log = logging.getLogger(__name__)


@dataclass
class _Local:
    """One local target of one image."""

    kind: str
    writer: ImageWriter | None
    state: Target = field(default_factory=lambda: Target("writing"))


class LocalFiles:
    """The local targets of one image. `lock` keeps to the backends' rule that a writer is
    used by one thread at a time; it is held while their files are written, and is this
    image's alone."""

    def __init__(self, device: str, manifest: OpenManifest, targets: Sequence[LocalTarget]):
        self.manifest = manifest
        self.lock = threading.Lock()
        self.targets: list[_Local] = []
        self.planes: dict[TileKey, PlaneMeta] = {}
        for target in targets:
            try:
                backend = registry.create(target.kind, folder=target.folder)
                local = _Local(target.kind, backend.open_image(device, manifest))
            except TilebridgeError as exc:
                local = _Local(target.kind, None, Target("failed", str(exc)))
                log.error("local %s for %s: %s", target.kind, manifest.image_name, exc)
            self.targets.append(local)

    def write(self, key: TileKey, pixels: np.ndarray[Any, Any], meta: PlaneMeta) -> None:
        with self.lock:
            if meta != PlaneMeta():
                self.planes[key] = meta
            for local in self._live():
                try:
                    local.writer.write_tile(key, pixels)  # type: ignore[union-attr]
                except (TilebridgeError, OSError) as exc:
                    self._failed(local, exc)

    def finish(self) -> None:
        with self.lock:
            for local in self._live():
                try:
                    local.writer.add_planes(self.planes)  # type: ignore[union-attr]
                    stored = local.writer.finish()  # type: ignore[union-attr]
                    local.state = Target("finished", location=stored.location)
                except (TilebridgeError, OSError) as exc:
                    self._failed(local, exc)

    def abort(self) -> None:
        with self.lock:
            for local in self.targets:
                if local.writer is not None and local.state.state == "writing":
                    local.writer.abort()
                    local.state = Target("failed", "aborted")

    def progress(self) -> dict[str, Target]:
        with self.lock:
            return {local.kind: local.state for local in self.targets}

    def _live(self) -> list[_Local]:
        return [t for t in self.targets if t.writer is not None and t.state.state == "writing"]

    def _failed(self, local: _Local, exc: BaseException) -> None:
        local.state = Target("failed", f"{type(exc).__name__}: {exc}")
        log.error("local %s of %s failed: %s", local.kind, self.manifest.image_name, exc)
        if local.writer is not None:
            local.writer.abort()  # gives a full disk its space back for the others


class Stopgap:
    """An `Edge` that adds local files and closing with holes to `inner`."""

    def __init__(self, inner: Edge, device: str) -> None:
        self.inner = inner
        self.device = device
        self._lock = threading.Lock()
        self._images: dict[UUID, tuple[OpenManifest, LocalFiles | None]] = {}

    def open(self, manifest: OpenManifest, local: Sequence[LocalTarget]) -> None:
        with self._lock:
            known = self._images.get(manifest.image_id)
        if known is None:  # an open the agent refused and the writer tries again is not new
            files = LocalFiles(self.device, manifest, local) if local else None
            with self._lock:
                self._images[manifest.image_id] = (manifest, files)
        self.inner.open(manifest, ())

    def write(
        self, image_id: UUID, key: TileKey, pixels: np.ndarray[Any, Any], meta: PlaneMeta
    ) -> bool:
        _, files = self._image(image_id)
        if files is not None:  # first: the local files do not wait for the server stream
            files.write(key, pixels, meta)
        return self.inner.write(image_id, key, pixels, meta)

    def close(self, image_id: UUID, never_taken: Sequence[TileKey]) -> None:
        manifest, files = self._image(image_id)
        if never_taken:
            log.warning(
                "image %s: %d tiles were never taken (a scan area with holes, or a stopped "
                "scan); they are stored as zeros",
                manifest.image_name, len(never_taken),
            )  # fmt: skip
            blank = np.zeros((manifest.tile_height, manifest.tile_width), manifest.dtype.numpy)
            blank.flags.writeable = False
            for key in never_taken:
                self.inner.write(image_id, key, blank, PlaneMeta())
                if files is not None:
                    files.write(key, blank, PlaneMeta())
        try:
            self.inner.close(image_id, ())
        finally:
            if files is not None:  # the local files are finished whatever the server stream did
                files.finish()

    def progress(self, image_id: UUID) -> Progress:
        _, files = self._image(image_id)
        server = self.inner.progress(image_id)
        local = files.progress() if files is not None else {}
        return Progress(image_id, {**local, **server.targets})

    def abort(self, image_id: UUID) -> None:
        _, files = self._image(image_id)
        if files is not None:
            files.abort()
        self.inner.abort(image_id)

    def _image(self, image_id: UUID) -> tuple[OpenManifest, LocalFiles | None]:
        with self._lock:
            found = self._images.get(image_id)
        if found is None:
            raise PermanentError(f"image {image_id} was not opened")
        return found


class NoServer:
    """An `Edge` that sends nothing anywhere (`stream_to_server` off: local files only)."""

    def open(self, manifest: OpenManifest, local: Sequence[LocalTarget]) -> None:
        del manifest, local

    def write(
        self, image_id: UUID, key: TileKey, pixels: np.ndarray[Any, Any], meta: PlaneMeta
    ) -> bool:
        del image_id, key, pixels, meta
        return True

    def close(self, image_id: UUID, never_taken: Sequence[TileKey]) -> None:
        del image_id, never_taken

    def progress(self, image_id: UUID) -> Progress:
        return Progress(image_id)

    def abort(self, image_id: UUID) -> None:
        del image_id
