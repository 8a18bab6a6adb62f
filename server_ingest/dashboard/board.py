"""The dashboard's picture of the facility: the latest retained status per topic.

Fed from the MQTT thread, read by the web app. Every change is handed to listeners as an
event dict while the lock is held, so a listener that took a snapshot with `listen()` sees
exactly the changes after it, in order.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from tilebridge_protocol.status import DeviceStatus, ImageStatus, IngestStatus
from tilebridge_protocol.topics import ROOT

log = logging.getLogger(__name__)

Kind = Literal["device", "ingest", "image"]
Event = dict[str, Any]
Listener = Callable[[Event | None], None]
"""Called with each event, or None when the board closes; must not block."""

MODELS: dict[Kind, type[DeviceStatus] | type[IngestStatus] | type[ImageStatus]] = {
    "device": DeviceStatus,
    "ingest": IngestStatus,
    "image": ImageStatus,
}
_OMERO_IMAGE = re.compile(r"^omero:Image:(\d+)")
HISTORY = 120
"""Throughput samples kept per device for its chart (10 min at the default 5 s interval)."""


def preview_key(topic: str) -> str | None:
    """`device/image_id` of an image preview topic, or None."""
    parts = topic.removeprefix(ROOT + "/").split("/")
    if topic.startswith(ROOT + "/") and len(parts) == 4 and parts[::3] == ["image", "preview"]:
        return f"{parts[1]}/{parts[2]}"
    return None


def classify(topic: str) -> tuple[Kind, str] | None:
    """The kind of a status topic and its key (device, instance or `device/image_id`)."""
    prefix = ROOT + "/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix) :].split("/")
    if parts[-1] != "status":
        return None
    if len(parts) == 3 and parts[0] == "dev":
        return "device", parts[1]
    if len(parts) == 3 and parts[0] == "ingest":
        return "ingest", parts[1]
    if len(parts) == 4 and parts[0] == "image":
        return "image", f"{parts[1]}/{parts[2]}"
    return None


def _key_of(kind: Kind, status: DeviceStatus | IngestStatus | ImageStatus) -> str:
    if isinstance(status, DeviceStatus):
        return status.device
    if isinstance(status, IngestStatus):
        return status.instance
    return f"{status.device}/{status.image_id}"


def omero_link(
    omero_web_url: str | None, locations: dict[str, str], per_target: dict[str, str] | None = None
) -> str | None:
    """OMERO.web's address of the image: of its target's server (`per_target`, by backend
    name, for several OMERO servers), else `omero_web_url`."""
    for backend, location in locations.items():
        base = (per_target or {}).get(backend, omero_web_url)
        match = _OMERO_IMAGE.match(location)
        if match and base:
            return f"{base}/webclient/?show=image-{match.group(1)}"
    return None


@dataclass
class _Entry:
    kind: Kind
    key: str
    status: dict[str, Any]
    links: dict[str, str]
    expires_at: float | None
    received_at: float = 0.0
    stale: bool = False
    """No status from this device or ingest for `stale_s`: revoked, cut off or dead without
    its last will being published; shown offline."""
    history: list[float] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "key": self.key,
            "status": self.status,
            "links": self.links,
        }
        if self.kind != "image":
            out["stale"] = self.stale
        if self.kind == "device":
            out["history"] = self.history
        return out


class StatusBoard:
    def __init__(
        self,
        omero_web_url: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        stale_s: float = 60.0,
        omero_web_urls: dict[str, str] | None = None,
    ) -> None:
        self.omero_web_url = omero_web_url
        self.omero_web_urls = dict(omero_web_urls or {})
        self._clock = clock
        self.stale_s = stale_s
        self._entries: dict[tuple[Kind, str], _Entry] = {}
        self._history: dict[str, deque[float]] = {}
        self._previews: dict[str, tuple[bytes, int, float | None]] = {}
        """`device/image_id` -> (png, version, expires at)."""
        self._versions = 0
        self._listeners: set[Listener] = set()
        self._monitor: dict[str, Any] = {"connected": False, "last_error": None}
        self._lock = threading.Lock()
        self.ignored = 0
        """Status messages that were not valid tilebridge status (logged, not shown)."""

    # -- input (the MQTT thread) ------------------------------------------------------------

    def apply(self, topic: str, payload: bytes, expiry_s: float | None = None) -> None:
        """One retained status message; an empty payload removes the topic's entry."""
        preview = preview_key(topic)
        if preview is not None:
            self._preview(preview, payload, expiry_s)
            return
        where = classify(topic)
        if where is None:
            return
        kind, key = where
        if not payload:
            self._remove(kind, key)
            return
        try:
            status = MODELS[kind].model_validate_json(payload)
        except ValidationError as exc:
            self._ignore(topic, f"invalid status: {exc.error_count()} errors")
            return
        if _key_of(kind, status) != key:
            self._ignore(topic, "status names another device or instance than its topic")
            return
        links: dict[str, str] = {}
        if isinstance(status, ImageStatus):
            link = omero_link(self.omero_web_url, status.locations, self.omero_web_urls)
            if link:
                links["omero"] = link
        now = self._clock()
        expires_at = now + expiry_s if expiry_s is not None else None
        entry = _Entry(kind, key, status.model_dump(mode="json"), links, expires_at, now)
        with self._lock:
            if isinstance(status, DeviceStatus):
                samples = self._history.setdefault(key, deque(maxlen=HISTORY))
                samples.append(status.throughput_bytes_per_s)
                entry.history = list(samples)
            self._entries[(kind, key)] = entry
            self._emit({"type": "status", "entry": entry.as_json()})

    def preview(self, key: str) -> bytes | None:
        """The latest preview PNG of image `device/image_id`, if the ingest sent one."""
        with self._lock:
            found = self._previews.get(key)
        return found[0] if found else None

    def _preview(self, key: str, payload: bytes, expiry_s: float | None) -> None:
        with self._lock:
            if not payload:
                if self._previews.pop(key, None) is not None:
                    self._emit({"type": "preview", "key": key, "version": None})
                return
            self._versions += 1
            expires = self._clock() + expiry_s if expiry_s is not None else None
            self._previews[key] = (payload, self._versions, expires)
            self._emit({"type": "preview", "key": key, "version": self._versions})

    def set_monitor(self, connected: bool, last_error: str | None) -> None:
        with self._lock:
            state = {"connected": connected, "last_error": last_error}
            if state != self._monitor:
                self._monitor = state
                self._emit({"type": "monitor", "monitor": state})

    def reset(self) -> None:
        """Forget everything (on reconnect, before the broker re-sends what is retained)."""
        with self._lock:
            self._entries.clear()
            self._previews.clear()
            self._emit({"type": "snapshot", **self._snapshot()})

    def expire(self) -> None:
        """Drop finished images whose retained message the broker has expired by now, and
        mark devices and ingests that went silent as stale."""
        now = self._clock()
        with self._lock:
            gone = [k for k, e in self._entries.items() if e.expires_at and e.expires_at <= now]
            for kind, key in gone:
                del self._entries[(kind, key)]
                self._emit({"type": "remove", "kind": kind, "key": key})
            for key, (_, _, expires) in list(self._previews.items()):
                if expires is not None and expires <= now:
                    del self._previews[key]
                    self._emit({"type": "preview", "key": key, "version": None})
            for entry in self._entries.values():
                silent = now - entry.received_at > self.stale_s
                if entry.kind != "image" and silent and not entry.stale:
                    entry.stale = True
                    self._emit({"type": "status", "entry": entry.as_json()})

    # -- output (the web app) ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot()

    def listen(self, listener: Listener) -> tuple[dict[str, Any], Callable[[], None]]:
        """Register `listener`; returns the snapshot it starts from and an unsubscribe."""
        with self._lock:
            self._listeners.add(listener)
            snapshot = self._snapshot()

        def unsubscribe() -> None:
            with self._lock:
                self._listeners.discard(listener)

        return snapshot, unsubscribe

    def close(self) -> None:
        """Tell every listener that no more events come (server shutdown)."""
        with self._lock:
            listeners, self._listeners = self._listeners, set()
        for listener in listeners:
            listener(None)

    # -- internals --------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        entries = sorted(self._entries.values(), key=lambda e: (e.kind, e.key))
        return {
            "omero_web_url": self.omero_web_url,
            "monitor": dict(self._monitor),
            "entries": [e.as_json() for e in entries],
            "previews": {key: version for key, (_, version, _) in self._previews.items()},
            "stale_s": self.stale_s,
        }

    def _remove(self, kind: Kind, key: str) -> None:
        with self._lock:
            if kind == "device":
                self._history.pop(key, None)
            if self._entries.pop((kind, key), None) is not None:
                self._emit({"type": "remove", "kind": kind, "key": key})

    def _ignore(self, topic: str, why: str) -> None:
        self.ignored += 1
        log.warning("ignored status on %s: %s", topic, why)

    def _emit(self, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # one broken page must not stop the others' updates
                log.exception("dashboard listener")
