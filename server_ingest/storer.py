"""Writes complete images from staging into every configured backend, off the MQTT thread.

A backend that is unreachable (`TransientError`) is retried with backoff while the tiles
stay staged; one that refuses for good (`PermanentError`) fails the image with its reason,
and the tiles still stay staged. Backends already done for an image are not written again
on a retry or after a restart (their locations are in the ledger).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol
from uuid import UUID

from server_ingest.ledger import Ledger, Phase
from server_ingest.staging import Staging
from tilebridge_protocol.broker import Backoff
from tilebridge_protocol.errors import PermanentError, TransientError
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_storage.base import StorageBackend

log = logging.getLogger(__name__)


class StoreListener(Protocol):
    def stored(self, image_id: UUID, locations: dict[str, str]) -> None: ...

    def store_failed(self, image_id: UUID, reason: ReasonCode, detail: str) -> None: ...

    def store_delayed(self, image_id: UUID, detail: str) -> None: ...


class Storer:
    def __init__(
        self,
        backends: Sequence[StorageBackend],
        ledger: Ledger,
        staging: Staging,
        keep_staged: bool = False,
        retry_s: float = 5.0,
        retry_max_s: float = 300.0,
        workers: int = 2,
    ) -> None:
        self.backends = list(backends)
        self.ledger = ledger
        self.staging = staging
        self.keep_staged = keep_staged
        self.listener: StoreListener | None = None
        self.backend_state: dict[str, str] = {b.name: "ok" for b in self.backends}
        self._retry = (retry_s, retry_max_s)
        self._due: list[tuple[float, int, UUID]] = []
        self._backoffs: dict[UUID, Backoff] = {}
        self._queued: set[UUID] = set()
        self._seq = 0
        self._cond = threading.Condition()
        self._stop = False
        self._threads = [
            threading.Thread(target=self._work, name=f"ingest-storer-{n}", daemon=True)
            for n in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        for backend in self.backends:
            backend.close()

    def submit(self, image_id: UUID, delay: float = 0.0) -> None:
        with self._cond:
            if image_id in self._queued:
                return
            self._queued.add(image_id)
            self._seq += 1
            heapq.heappush(self._due, (time.monotonic() + delay, self._seq, image_id))
            self._cond.notify()

    def busy(self) -> int:
        with self._cond:
            return len(self._queued)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (not self._due or self._due[0][0] > time.monotonic()):
                    timeout = self._due[0][0] - time.monotonic() if self._due else None
                    self._cond.wait(timeout)
                if self._stop:
                    return
                _, _, image_id = heapq.heappop(self._due)
            try:
                self._store(image_id)
            except TransientError as exc:
                backoff = self._backoffs.setdefault(image_id, Backoff(*self._retry))
                delay = backoff.next_delay()
                log.warning("image %s: %s; retrying in %.1f s", image_id, exc, delay)
                self._notify_delayed(image_id, str(exc))
                with self._cond:
                    self._queued.discard(image_id)
                self.submit(image_id, delay)
                continue
            except PermanentError as exc:
                log.error("image %s: %s", image_id, exc)
                if self.listener:
                    self.listener.store_failed(image_id, ReasonCode.STORAGE_FAILED, str(exc))
            except Exception as exc:  # a bug in a backend must not kill the worker
                log.exception("image %s: unexpected error in a backend", image_id)
                if self.listener:
                    self.listener.store_failed(image_id, ReasonCode.STORAGE_FAILED, repr(exc))
            self._backoffs.pop(image_id, None)
            with self._cond:
                self._queued.discard(image_id)

    def _notify_delayed(self, image_id: UUID, detail: str) -> None:
        if self.listener:
            self.listener.store_delayed(image_id, detail)

    def _store(self, image_id: UUID) -> None:
        record = self.ledger.image(image_id)
        if record is None or record.manifest is None or record.phase is not Phase.STORING:
            return
        manifest, device = record.manifest, record.device
        locations = dict(record.locations)
        for backend in self.backends:
            if backend.name in locations:
                continue
            writer = backend.open_image(device, manifest)
            try:
                for key in manifest.tile_keys():
                    writer.write_tile(key, self.staging.load(device, manifest, key))
                stored = writer.finish()
            except (TransientError, PermanentError) as exc:
                writer.abort()
                self.backend_state[backend.name] = str(exc)
                raise
            except BaseException:
                writer.abort()
                raise
            self.backend_state[backend.name] = "ok"
            locations[backend.name] = stored.location
            self.ledger.set_phase(image_id, Phase.STORING, locations=locations)
        if not self.keep_staged:
            self.staging.remove_image(device, image_id)
        if self.listener:
            self.listener.stored(image_id, locations)
