"""The ledger's one writer thread ("ingest-ledger"): batches, retries, answers.

The core hands it records to persist (with a token) and keys to look up. Each turn takes
everything queued, answers the look-ups, writes every record in one transaction, then posts
`Durable(tokens)`: only then does the core send the acks those records justify. A write that
fails transiently (disk full) is retried with backoff, the same batch, in order, until it
passes; the core learns of the trouble (`LedgerTrouble`) and keeps running.

Look-ups are answered before the turn's writes: the core asks only about images it does not
hold, and it lets an image go only once all its records are durable, so no write pending
here can concern a key being looked up.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from server_ingest.events import Durable, InboxItem, LedgerTrouble, Looked
from server_ingest.ledger.base import Ledger
from server_ingest.ledger.records import ImageKey, Record
from tilebridge_protocol.errors import TransientError
from tilebridge_runtime.backoff import Backoff

log = logging.getLogger(__name__)

BATCH_MAX = 4096
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Write:
    records: tuple[Record, ...]
    token: int


@dataclass(frozen=True, slots=True)
class _Lookup:
    key: ImageKey


class LedgerWriter:
    def __init__(
        self, ledger: Ledger, post: Callable[[InboxItem], None], backoff: Backoff | None = None
    ) -> None:
        self._ledger = ledger
        self._post = post
        self._backoff = backoff or Backoff(0.2, 10.0)
        self._queue: queue.SimpleQueue[_Write | _Lookup | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest-ledger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued (unless the disk refuses), then end the thread."""
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # -- called by the core (never blocks) --------------------------------------------------

    def persist(self, records: tuple[Record, ...], token: int) -> None:
        self._queue.put(_Write(records, token))

    def lookup(self, key: ImageKey) -> None:
        self._queue.put(_Lookup(key))

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = None in batch
            keys = [item.key for item in batch if isinstance(item, _Lookup)]
            writes = [item for item in batch if isinstance(item, _Write)]
            if keys:
                done, found = self._until_done(partial(self._ledger.lookup, keys), stopping)
                for key in keys if done else ():
                    self._post(Looked(key, (found or {}).get(key)))
            if writes:
                records = [r for w in writes for r in w.records]
                done, _ = self._until_done(partial(self._ledger.write, records), stopping)
                if done:
                    self._post(Durable(tuple(w.token for w in writes)))

    def _until_done(self, call: Callable[[], T], stopping: bool) -> tuple[bool, T | None]:
        """`call()`, retried while it fails transiently; (False, None) if given up at stop."""
        troubled = False
        while True:
            try:
                result = call()
            except TransientError as exc:
                if not troubled:
                    log.error("%s; retrying (no acks until it passes)", exc)
                    self._post(LedgerTrouble(str(exc)))
                    troubled = True
                if stopping or self._stop.wait(self._backoff.next_delay()):
                    return False, None  # not durable: nothing was acknowledged for these
                continue
            if troubled:
                log.info("ledger writes again")
                self._post(LedgerTrouble(None))
            self._backoff.reset()
            return True, result
