"""The claims thread ("ingest-claims"): claims devices for the core, renews every claim this
instance holds, and takes over the devices of instances that stopped renewing.

The core asks about a device (`ask`, never blocks); the answer comes back to its inbox as an
`Owner` event. When we just took a device (its claim was free, expired, or ours from before
a restart) the device's partial tiles are dropped from the shared staging (whoever wrote
them is gone; the device sends those tiles again) and its images with staged tiles are read
from the ledger and handed over in the same event, so the core holds them before it handles
any of the device's messages.

Every quarter lease all our claims are renewed in one statement. If renewing has not
succeeded for half a lease (the ledger unreachable, or this process was frozen), the thread
raises `LeaseLostError` and the process ends (exit 70, restarted by systemd): an instance that
cannot prove its claims stops before anyone else may take them, so two instances never
handle one device. Every half lease it looks for orphans: devices with images in progress
whose claim expired (their instance died), and claims them, so a dead instance's images are
finished even if their devices send nothing more.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from server_ingest.claims import DEVICE, Claims
from server_ingest.events import InboxItem, Owner
from server_ingest.ledger.base import Ledger
from server_ingest.ledger.records import StoredImage
from server_ingest.routing import NO_ONE
from server_ingest.staging import Staging
from tilebridge_protocol.errors import TransientError

log = logging.getLogger(__name__)


class LeaseLostError(RuntimeError):
    """Our claims could not be renewed in time: another instance may take them now."""


class Claimer:
    def __init__(
        self,
        claims: Claims,
        ledger: Ledger,
        staging: Staging,
        post: Callable[[InboxItem], None],
    ) -> None:
        self._claims = claims
        self._ledger = ledger
        self._staging = staging
        self._post = post
        self._lease = claims.lease_s
        self._asked: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._held: set[str] = set()
        self.valid_until = float("inf")
        """Monotonic time until which our claims are proven (read by the core)."""
        self._thread = threading.Thread(target=self._run, name="ingest-claims", daemon=True)

    def start(self) -> None:
        self._renew()  # raises if the ledger is unreachable: nothing is ours yet
        self._thread.start()

    def stop(self) -> None:
        """End the thread and give our devices back, so others take them over at once."""
        self._asked.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for device in sorted(self._held):
            try:
                self._claims.release(DEVICE, device)
            except TransientError as exc:  # they expire by themselves
                log.warning("could not give device %s back: %s", device, exc)
        self._held.clear()

    def ask(self, device: str) -> None:
        self._asked.put(device)

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        renew_every, sweep_every = self._lease / 4, self._lease / 2
        renewed = swept = time.monotonic()
        self._claim_ours()
        while True:
            now = time.monotonic()
            wait = max(0.0, min(renewed + renew_every, swept + sweep_every) - now)
            try:
                device = self._asked.get(timeout=wait)
            except queue.Empty:
                device = ""
            if device is None:
                return
            now = time.monotonic()
            if now >= renewed + renew_every:
                renewed = now
                self._renew()
            if now >= self.valid_until and self._held:
                raise LeaseLostError(
                    f"claims of {len(self._held)} devices not renewed for {self._lease / 2:.0f} s"
                )
            if now >= swept + sweep_every:
                swept = now
                self._sweep()
            if device:
                self._claim(device)

    def _renew(self) -> None:
        started = time.monotonic()
        try:
            still = self._claims.renew()
        except TransientError as exc:
            log.error("cannot renew our claims (%s); they hold until %.1f s from now", exc,
                      self.valid_until - started)  # fmt: skip
            return
        lost = {d for d in self._held if (DEVICE, d) not in still}
        if lost:
            raise LeaseLostError(f"devices {sorted(lost)} were taken over while we held them")
        self.valid_until = started + self._lease / 2

    def _claim_ours(self) -> None:
        """Devices still claimed by this instance from before a restart: take them up."""
        try:
            for device in self._claims.held():
                self._claim(device)
        except TransientError as exc:
            log.warning("cannot list our claims now: %s", exc)

    def _sweep(self) -> None:
        try:
            orphans = self._claims.orphans()
        except TransientError as exc:
            log.warning("cannot look for orphaned devices now: %s", exc)
            return
        for device in orphans:
            if device not in self._held:
                self._claim(device)

    def _claim(self, device: str) -> None:
        try:
            claim = self._claims.claim(DEVICE, device)
            if claim.holder != self._claims.me:
                self._post(Owner(device, claim.holder or NO_ONE, claim.valid_s))
                return
            images: tuple[StoredImage, ...] = ()
            if device not in self._held:
                dropped = self._staging.drop_partials(device)
                images = tuple(self._ledger.recover([device]))
                log.info(
                    "took device %s over: %d images with staged tiles, %d partial tiles dropped",
                    device, len(images), dropped,
                )  # fmt: skip
                self._held.add(device)
        except TransientError as exc:
            log.warning("cannot claim device %s now: %s", device, exc)
            self._post(Owner(device, NO_ONE, 0.0))
            return
        self._post(Owner(device, self._claims.me, claim.valid_s, images))
