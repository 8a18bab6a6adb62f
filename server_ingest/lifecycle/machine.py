"""`step`: the lifecycle's one function (see the package docstring for the rules it keeps)."""

from __future__ import annotations

from dataclasses import replace

from server_ingest.ledger.records import (
    BackendStored,
    CloseReceived,
    ImageKey,
    ImageOpened,
    ImageRefused,
    PhaseSet,
    Record,
    TileStaged,
)
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
from tilebridge_protocol.messages import (
    ErrorAck,
    ImageAck,
    ImageState,
    ManifestState,
    OpenAck,
    TileAck,
    TileState,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.status import ImagePhase as Phase
from tilebridge_protocol.topics import DeviceTopic, device_topic


def step(image: Image | None, key: ImageKey, event: Event, policy: Policy) -> Step:
    """The next state of the image `key` (None: unknown) after `event`, and what to do."""
    if image is None:
        return _unknown(key, event)
    if isinstance(event, Opened):
        return _opened(image, event)
    if isinstance(event, OpenRefused):
        return Step(image, (_refuse_open(key, event.reason, event.detail),))
    if image.phase is Phase.DISCARDED:
        return _discarded(image, event)
    if isinstance(event, Staged):
        return _staged(image, event)
    if isinstance(event, Closed):
        return _closed(image, event)
    if isinstance(event, Stored):
        if image.phase not in (Phase.RECEIVING, Phase.STORING):
            return Step(image)
        locations = (
            *[kv for kv in image.locations if kv[0] != event.backend],
            (event.backend, event.location),
        )
        digests = tuple(kv for kv in image.digests if kv[0] != event.backend)
        if event.digest is not None:
            digests += ((event.backend, event.digest),)
        record = BackendStored(key, event.backend, event.location, event.digest)
        stored = replace(image, locations=locations, digests=digests)
        return Step(stored, (Persist((record,)),))
    if isinstance(event, StoreDone):
        return _store_done(image, event, policy)
    if isinstance(event, StoreDelayed):
        if image.phase not in (Phase.RECEIVING, Phase.STORING):
            return Step(image)
        return Step(replace(image, delayed=f"{event.backend}: {event.detail}"), (Publish(True),))
    if isinstance(event, StoreFailed):
        if image.phase not in (Phase.RECEIVING, Phase.STORING):
            return Step(image)
        return _fail(image, event.at, event.reason, f"{event.backend}: {event.detail}")
    if isinstance(event, Tick):
        return _tick(image, event, policy)
    if isinstance(event, Retry):
        return _retry(image, event)
    return _discard(image, event)


def _unknown(key: ImageKey, event: Event) -> Step:
    if isinstance(event, Opened):
        image = Image(
            key,
            Phase.RECEIVING,
            manifest_id(event.manifest),
            event.manifest.tile_count,
            last_seen=event.at,
        )
        accepted = Send(OpenAck(image_id=key.image_id, state=ManifestState.ACCEPTED))
        persist = Persist((ImageOpened(key, event.manifest, event.at),), (accepted, Publish(True)))
        return Step(image, (persist, StoreBegin()))
    if isinstance(event, OpenRefused):
        image = Image(
            key, Phase.REJECTED, reason=event.reason, detail=event.detail, last_seen=event.at
        )
        record = ImageRefused(key, event.reason, event.detail, event.at)
        refusal = _refuse_open(key, event.reason, event.detail)
        return Step(image, (refusal, Persist((record,), (Publish(True), Forget()))))
    if isinstance(event, Closed):
        return Step(
            None,
            (
                Send(
                    _error(
                        key,
                        ReasonCode.UNKNOWN_IMAGE,
                        "close for an image without an accepted open: send open first",
                    )
                ),
            ),
        )
    return Step(None)


def _opened(image: Image, event: Opened) -> Step:
    key = image.key
    same = image.manifest_id == manifest_id(event.manifest)
    if image.phase in (Phase.REJECTED, Phase.EXPIRED) and (same or image.manifest_id is None):
        # A second chance: a refused image with a valid open now, an expired one revived.
        revived = replace(
            image,
            phase=Phase.RECEIVING,
            manifest_id=manifest_id(event.manifest),
            # An expired image keeps its close (and what it lists), a refused one has none.
            tile_count=image.tile_count if image.closed else event.manifest.tile_count,
            reason=None,
            detail=None,
            last_seen=event.at,
        )
        accepted = Send(OpenAck(image_id=key.image_id, state=ManifestState.ACCEPTED))
        persist = Persist((ImageOpened(key, event.manifest, event.at),), (accepted, Publish(True)))
        return Step(revived, (persist, StoreBegin()))
    if image.phase is Phase.DISCARDED:
        detail = image.detail or DISCARDED_DETAIL
        return Step(image, (_refuse_open(key, ReasonCode.NOT_PERMITTED, detail),))
    if same and image.phase is Phase.FAILED and image.reason in RESEND_RETRIES:
        # The device sends the image again after a server-side failure (an admin re-sent
        # its `rejected/` tiles, say): that is a retry, from the tiles already staged.
        retried = _retry(image, Retry(event.at))
        accepted = Send(OpenAck(image_id=key.image_id, state=ManifestState.ACCEPTED))
        first, *rest = retried.effects
        assert isinstance(first, Persist)
        return Step(retried.image, (replace(first, then=(accepted, *first.then)), *rest))
    if not same:
        detail = "this image id is already open with another manifest"
        return Step(image, (_refuse_open(key, ReasonCode.CONFLICT, detail),))
    if image.phase is Phase.REJECTED:  # refused with this very manifest before
        return Step(
            image,
            (_refuse_open(key, image.reason or ReasonCode.INVALID_MANIFEST, image.detail or ""),),
        )
    then: tuple[Effect, ...] = (Send(OpenAck(image_id=key.image_id, state=ManifestState.ACCEPTED)),)
    then += _final_ack(image)
    return Step(replace(image, last_seen=max(image.last_seen, event.at)), (Persist((), then),))


def _staged(image: Image, event: Staged) -> Step:
    if image.phase not in (Phase.RECEIVING, Phase.FAILED):
        return Step(image)
    key = image.key
    image = replace(image, committed=image.committed + 1, last_seen=event.at)
    record = TileStaged(key, event.tile, event.digest, event.nbytes)
    ack = Send(TileAck(image_id=key.image_id, tile=event.tile, state=TileState.COMMITTED))
    if image.phase is Phase.FAILED:
        return Step(image, (Persist((record,), (ack, *_final_ack(image))),))
    if image.all_in:
        return _start_storing(image, event.at, (record,), (ack,), (StoreTile(event.tile),))
    return Step(image, (Persist((record,), (ack, Publish())), StoreTile(event.tile)))


def _closed(image: Image, event: Closed) -> Step:
    key = image.key
    if image.phase in (Phase.REJECTED, Phase.EXPIRED):
        reason = (
            ReasonCode.INVALID_MANIFEST
            if image.phase is Phase.REJECTED
            else (ReasonCode.UNKNOWN_IMAGE)
        )
        return Step(
            image,
            (
                Send(
                    _error(
                        key, reason, "close for an image without an accepted open: send open first"
                    )
                ),
            ),
        )
    shape = event.close.shape()
    if image.closed or image.phase is Phase.COMPLETE:
        if image.close_shape is not None and image.close_shape != shape:
            detail = (
                "this close differs from the one the image was closed with (full or partial, "
                "the tiles listed, the positions not planned): the first close stands"
            )
            return Step(image, (Send(_error(key, ReasonCode.CONFLICT, detail)),))
        return Step(image, (Persist((), _final_ack(image)),) if _final_ack(image) else ())
    committed = image.committed if event.committed is None else event.committed
    image = replace(
        image,
        closed=True,
        close_shape=shape,
        tile_count=event.close.tile_count,
        committed=committed,
        last_seen=event.at,
    )
    record = CloseReceived(key, event.close)
    if image.phase is Phase.FAILED:
        return Step(image, (Persist((record,), _final_ack(image)),))
    if event.conflicts:
        detail = f"{event.conflicts} staged tiles differ from the close digests"
        failed = _fail(image, event.at, ReasonCode.CONFLICT, detail)
        return Step(failed.image, (Persist((record,)), StoreCancel(), *failed.effects))
    if image.all_in:
        return _start_storing(image, event.at, (record,), (), ())
    return Step(image, (Persist((record,), (Publish(True),)),))


def _start_storing(
    image: Image,
    at: float,
    records: tuple[Record, ...],
    then: tuple[Effect, ...],
    before: tuple[Effect, ...],
) -> Step:
    image = replace(image, phase=Phase.STORING)
    records = (*records, PhaseSet(image.key, Phase.STORING, at))
    return Step(image, (Persist(records, (*then, Publish(True))), *before, StoreFinish()))


def _store_done(image: Image, event: StoreDone, policy: Policy) -> Step:
    if image.phase is not Phase.STORING:
        return Step(image)
    image = replace(image, phase=Phase.COMPLETE, delayed=None)
    record = PhaseSet(image.key, Phase.COMPLETE, event.at)
    then = (*_final_ack(image), Publish(True))
    if not policy.keep_staged:
        then += (RemoveStaging(),)
    return Step(image, (Persist((record,), (*then, Forget())),))


def _fail(image: Image, at: float, reason: ReasonCode, detail: str) -> Step:
    image = replace(image, phase=Phase.FAILED, reason=reason, detail=detail, delayed=None)
    record = PhaseSet(image.key, Phase.FAILED, at, reason, detail)
    return Step(image, (Persist((record,), (*_final_ack(image), Publish(True))),))


def _tick(image: Image, event: Tick, policy: Policy) -> Step:
    if image.phase is not Phase.RECEIVING or event.at - image.last_seen < policy.image_ttl_s:
        return Step(image)
    detail = f"no tile and no close for {policy.image_ttl_s:.0f} s"
    image = replace(image, phase=Phase.EXPIRED, reason=None, detail=detail)
    record = PhaseSet(image.key, Phase.EXPIRED, event.at, None, detail)
    then: tuple[Effect, ...] = (Publish(True),)
    if image.committed == 0:  # nothing to keep: the ledger remembers it, revivable by an open
        then += (RemoveStaging(), Forget())
    return Step(image, (StoreCancel(), Persist((record,), then)))


def _retry(image: Image, event: Retry) -> Step:
    if image.phase is not Phase.FAILED:
        return Step(image)
    image = replace(image, phase=Phase.RECEIVING, reason=None, detail=None, last_seen=event.at)
    record = PhaseSet(image.key, Phase.RECEIVING, event.at)
    if image.all_in:
        return _start_storing(image, event.at, (record,), (), (StoreBegin(),))
    return Step(image, (Persist((record,), (Publish(True),)), StoreBegin()))


def _discard(image: Image, event: Discard) -> Step:
    if image.phase in (Phase.COMPLETE, Phase.REJECTED):
        return Step(image)
    key = image.key
    detail = clip(event.detail) or DISCARDED_DETAIL
    image = replace(
        image, phase=Phase.DISCARDED, reason=ReasonCode.NOT_PERMITTED, detail=detail, delayed=None
    )
    record = PhaseSet(key, Phase.DISCARDED, event.at, ReasonCode.NOT_PERMITTED, detail)
    # Rejecting the open tells the device to set the whole image aside, whatever it holds.
    refusal = Send(
        OpenAck(
            image_id=key.image_id,
            state=ManifestState.REJECTED,
            reason=ReasonCode.NOT_PERMITTED,
            detail=detail,
        )
    )
    then = (refusal, Publish(True), RemoveStaging(), Forget())
    return Step(image, (StoreCancel(), Persist((record,), then)))


def _discarded(image: Image, event: Event) -> Step:
    if isinstance(event, Closed):
        detail = image.detail or DISCARDED_DETAIL
        return Step(image, (_refuse_open(image.key, ReasonCode.NOT_PERMITTED, detail),))
    return Step(image)


def _final_ack(image: Image) -> tuple[Effect, ...]:
    """The image ack, if the image is finished and the device may now let go of it."""
    image_id = image.key.image_id
    if image.phase is Phase.COMPLETE:
        return (
            Send(
                ImageAck(
                    image_id=image_id,
                    state=ImageState.COMPLETE,
                    locations=dict(image.locations),
                    digests=dict(image.digests),
                )
            ),
        )
    if image.phase is Phase.FAILED and image.all_in:
        return (
            Send(
                ImageAck(
                    image_id=image_id,
                    state=ImageState.FAILED,
                    reason=image.reason,
                    detail=clip(image.detail),
                )
            ),
        )
    return ()


def _refuse_open(key: ImageKey, reason: ReasonCode, detail: str) -> Send:
    return Send(
        OpenAck(
            image_id=key.image_id, state=ManifestState.REJECTED, reason=reason, detail=clip(detail)
        )
    )


def _error(key: ImageKey, reason: ReasonCode, detail: str) -> ErrorAck:
    return ErrorAck(
        image_id=key.image_id,
        reason=reason,
        detail=detail,
        topic=device_topic(key.device, DeviceTopic.CLOSE),
    )


RESEND_RETRIES = frozenset({ReasonCode.STORAGE_FAILED, ReasonCode.VERIFY_FAILED})
"""Failures a resent open retries: the backend's, not the device's (a `conflict` between the
close and the staged tiles stays failed until an administrator decides)."""

MAX_DETAIL = 900
"""Reasons quote the input; keep them within an ack's 1024-character `detail`."""


def clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_DETAIL:
        return text
    return f"{text[: MAX_DETAIL - 3]}..."
