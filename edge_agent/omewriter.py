"""ImSwitch's OMEWriter, backed by tilebridge: local OME-TIFF / OME-Zarr / stitched TIFF and the
stream to the server (which writes OMERO), in any combination.

The acquisition thread only validates a frame, hands it to the agent's durable disk buffer
(the server stream) and queues it for the local backends. Each local backend has its own
worker thread, so a slow or failing backend never holds up the camera or the others; frames
not yet written by every local backend are bounded in bytes (`max_bytes_in_flight`), and
`write_frame` blocks only when that bound is reached. A backend that fails is recorded with
what it lost and the others carry on; its partial output is removed (that gives a full disk
its space back for the others).

The parts live in `edge_agent.writer`; their public names are re-exported here.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_agent.agent import EdgeAgent
from edge_agent.api import FrameMetadata
from edge_agent.writer.config import (
    LOCAL_BACKENDS,
    SERVER,
    Compression,
    MiB,
    OMEWriterConfig,
    apply_transport,
    use_transport,
)
from edge_agent.writer.experiment import Experiment, ExperimentProgress
from edge_agent.writer.experiment_spec import MAX_FRAMES, ExperimentSpec, Grid, Point
from edge_agent.writer.frames import FrameInfo
from edge_agent.writer.workers import backend_factories
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import OpenManifest
from tilebridge_protocol.status import BackendProgress
from tilebridge_storage.base import StorageBackend

__all__ = [
    "LOCAL_BACKENDS",
    "MAX_FRAMES",
    "SERVER",
    "Compression",
    "ExperimentProgress",
    "ExperimentSpec",
    "FrameInfo",
    "Grid",
    "MiB",
    "OMEWriter",
    "OMEWriterConfig",
    "Point",
    "apply_transport",
]


class OMEWriter:
    """One acquisition at a time: `start_experiment`, `write_frame` per frame, `finalize`.

    `backends` replaces the configured local backends (tests, custom storage).
    """

    def __init__(
        self,
        agent: EdgeAgent,
        config: OMEWriterConfig | None = None,
        backends: Mapping[str, StorageBackend] | None = None,
    ) -> None:
        self.agent = agent
        self.config = config if config is not None else OMEWriterConfig.for_agent(agent)
        self._backends = backends
        self._lock = threading.Lock()
        self.current: Experiment | None = None
        self.last: Experiment | None = None
        use_transport(agent, self.config)
        # The device status shows the newest writer's experiment.
        agent.set_backends_source(self._status_backends)

    @property
    def manifest(self) -> OpenManifest:
        return self._experiment().manifest

    def start_experiment(
        self, spec: ExperimentSpec | Mapping[str, Any] | None = None, **fields: Any
    ) -> OpenManifest:
        """Open the image everywhere; the manifest's `image_id` names the experiment."""
        spec = (
            spec
            if isinstance(spec, ExperimentSpec)
            else ExperimentSpec(**dict(spec or {}), **fields)
        )
        with self._lock:
            if self.current is not None and self.current.state == "acquiring":
                raise PermanentError(
                    f"experiment {self.current.manifest.experiment} is still acquiring; "
                    "finalize or abort it first"
                )
            use_transport(self.agent, self.config)
            manifest = spec.manifest(self.config)
            self.current = self.last = Experiment(
                self.agent,
                self.config,
                manifest,
                backend_factories(self.config, self._backends),
            )
            self.agent.set_backends_source(self._status_backends)
            return manifest

    def write_frame(
        self,
        frame: np.ndarray[Any, Any],
        metadata: FrameInfo | FrameMetadata | Mapping[str, Any],
        *,
        owned: bool = False,
    ) -> bool:
        """Hand one frame to every target; False if this frame was already written.

        Returns once the frame is in the durable disk buffer and queued for the local
        backends; blocks only while `max_bytes_in_flight` is reached. `owned=True` says the
        caller will never touch `frame` again, which saves a copy.
        """
        return self._experiment().write(frame, FrameInfo.of(metadata), owned)

    def key_of(self, metadata: FrameInfo | FrameMetadata | Mapping[str, Any]) -> TileKey:
        """The tile a frame with this metadata is (PermanentError if it is none)."""
        return self._experiment().key(FrameInfo.of(metadata))

    def finalize(self, timeout: float | None = None) -> ExperimentProgress:
        """Close the image: the server stream gets its close manifest, the local backends
        finish their files (waited for up to `timeout` seconds; None waits for good)."""
        experiment = self._experiment()
        experiment.finalize(timeout)
        with self._lock:
            if self.current is experiment:
                self.current = None
        return experiment.progress()

    def abort(self) -> None:
        """Stop writing locally and discard partial local output (the buffered frames of the
        server stream are kept and still sent)."""
        experiment = self._experiment()
        experiment.abort()
        with self._lock:
            if self.current is experiment:
                self.current = None

    def progress(self) -> ExperimentProgress | None:
        experiment = self.current or self.last
        return experiment.progress() if experiment else None

    def _status_backends(self) -> dict[str, BackendProgress] | None:
        progress = self.progress()
        return None if progress is None else progress.backends

    def _experiment(self) -> Experiment:
        experiment = self.current or self.last
        if experiment is None:
            raise PermanentError("no experiment started")
        return experiment
