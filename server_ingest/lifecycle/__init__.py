"""The lifecycle of one image: `step(image, event, policy) -> Step(image, effects)`, pure.

No I/O, no threads, no clock: time arrives in the events. The core (core.py) applies the
events of every image in order and carries out the effects, which are data.

    (none) --Opened--> RECEIVING --Closed + every tile staged--> STORING --StoreDone--> COMPLETE
    (none) --OpenRefused--> REJECTED --Opened--> RECEIVING        (a second chance)
    RECEIVING/STORING --StoreFailed--> FAILED --Retry--> RECEIVING/STORING
    RECEIVING --Closed with staged tiles contradicting it--> FAILED
    RECEIVING --Tick after image_ttl_s without news--> EXPIRED --Opened--> RECEIVING
    any but COMPLETE/REJECTED --Discard--> DISCARDED

Rules kept by construction (tests/ingest/test_lifecycle.py checks every pair):

* An ack that lets the device forget something (open accepted, tile committed, image
  complete or failed) is only ever sent in the `then` of a `Persist`: after the records that
  justify it are durable. Refusals are sent at once; they let the device forget nothing.
* Only `StoreFailed` (a backend's permanent refusal) and a contradicting close fail an image.
  A full disk, an unreachable or crashing OMERO are `StoreDelayed`: retried, never failed.
* A failed image is answered `failed` only once its close is in and every tile is staged, so
  the device never drops a tile the server lacks.
* An image leaves memory (`Forget`) only after its last record is durable.
"""

from server_ingest.lifecycle.machine import MAX_DETAIL, clip, step
from server_ingest.lifecycle.model import (
    DISCARDED_DETAIL,
    Closed,
    Discard,
    Effect,
    Event,
    Forget,
    Image,
    Opened,
    OpenRefused,
    Persist,
    Policy,
    Publish,
    RemoveStaging,
    Retry,
    Send,
    Staged,
    Step,
    StoreBegin,
    StoreCancel,
    Stored,
    StoreDelayed,
    StoreDone,
    StoreFailed,
    StoreFinish,
    StoreTile,
    Tick,
    manifest_id,
)

__all__ = [
    "DISCARDED_DETAIL",
    "MAX_DETAIL",
    "Closed",
    "Discard",
    "Effect",
    "Event",
    "Forget",
    "Image",
    "OpenRefused",
    "Opened",
    "Persist",
    "Policy",
    "Publish",
    "RemoveStaging",
    "Retry",
    "Send",
    "Staged",
    "Step",
    "StoreBegin",
    "StoreCancel",
    "StoreDelayed",
    "StoreDone",
    "StoreFailed",
    "StoreFinish",
    "StoreTile",
    "Stored",
    "Tick",
    "clip",
    "manifest_id",
    "step",
]
