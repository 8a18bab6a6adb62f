"""JSON messages of protocol v1: the `open` and `close` manifests and the acks.

Every model is frozen and rejects unknown fields, so a typo on one side is an error on the
other, not a silently ignored value. `decode()` checks the version before anything else, so a
message of a future version is refused with `unsupported_version`, never misread.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import numpy as np
import xxhash
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from tilebridge_protocol.compressed import decompress, is_compressed, maybe_compress
from tilebridge_protocol.errors import ProtocolError
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.reasons import ReasonCode

PROTOCOL_VERSION = 1

MAX_JSON_BYTES = 4 * 1024 * 1024
"""Largest JSON message either side accepts on the wire. A close manifest above
`compressed.COMPRESS_ABOVE` travels zstd-compressed, so ~60k tiles with plane metadata fit."""

# Names end up in OMERO and in archive paths: no separators, no leading dot, no control chars.
Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.,()+=@-]*$"),
]
Text = Annotated[str, StringConstraints(max_length=1024)]
Color = Annotated[str, StringConstraints(pattern=r"^[0-9A-F]{6}$")]
"""A display colour as RRGGBB hex, upper case (what OME-Zarr's `omero` block holds)."""


class PixelType(StrEnum):
    """Pixel types every backend (OMERO included) can store. Little-endian on the wire."""

    UINT8 = "uint8"
    INT8 = "int8"
    UINT16 = "uint16"
    INT16 = "int16"
    UINT32 = "uint32"
    INT32 = "int32"
    FLOAT32 = "float32"
    FLOAT64 = "float64"

    @property
    def numpy(self) -> np.dtype[Any]:
        """The little-endian numpy dtype used on the wire and in staging."""
        return np.dtype(self.value).newbyteorder("<")


class Layout(StrEnum):
    MOSAIC = "mosaic"
    """One image: tiles placed on a canvas by stage position."""
    PER_TILE = "per_tile"
    """One image per stage position, its position recorded."""


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class StagePosition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0)
    x_um: float = Field(allow_inf_nan=False)
    y_um: float = Field(allow_inf_nan=False)
    z_um: float = Field(default=0.0, allow_inf_nan=False)


class PixelSize(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    x_um: float = Field(gt=0, allow_inf_nan=False)
    y_um: float = Field(gt=0, allow_inf_nan=False)
    z_um: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class Well(BaseModel):
    """The plate well an image shows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    plate: Name
    """The plate's name (e.g. its labware type); OMERO files the image in a dataset of it."""
    row: Annotated[str, StringConstraints(pattern=r"^[A-Z]{1,2}$")]
    column: int = Field(ge=1, le=999)
    """1-based, as printed on the plate."""
    condition: Text | None = None
    """What was done to this well (a label the experimenter gave)."""

    @property
    def name(self) -> str:
        return f"{self.row}{self.column}"


OPTIONAL_OPEN_FIELDS = (
    "channel_colors", "time_interval_s", "first_time_point", "well", "omero_project_id",
    "omero_dataset_id",
)  # fmt: skip
"""Open fields added after the first release of v1: left out on the wire while unset, so a
manifest that does not use them is byte for byte what an older ingest accepts."""


class OpenManifest(_Message):
    """Announces an image. Sent before its tiles and again whenever the ingest asks for it.

    `image_id` is chosen by the device once and never changes on retries. The image has
    `len(positions) * size_z * size_c * size_t` tiles of `tile_height x tile_width` pixels.
    """

    image_id: UUID
    experiment: Name
    project: Name
    dataset: Name
    image_name: Name
    layout: Layout = Layout.MOSAIC
    tile_width: int = Field(ge=1, le=65536)
    tile_height: int = Field(ge=1, le=65536)
    size_z: int = Field(default=1, ge=1, le=10000)
    size_c: int = Field(default=1, ge=1, le=64)
    size_t: int = Field(default=1, ge=1, le=100000)
    dtype: PixelType
    positions: tuple[StagePosition, ...] = Field(min_length=1, max_length=100000)
    pixel_size: PixelSize
    channels: tuple[Name, ...] = ()
    acquired_at: AwareDatetime
    key_values: dict[Name, Text] = Field(default_factory=dict, max_length=256)
    tags: tuple[Name, ...] = Field(default=(), max_length=64)
    channel_colors: tuple[Color, ...] = ()
    """Display colour per channel (one per `size_c`, or empty: the backend's default)."""
    time_interval_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Planned seconds between time points (OME TimeIncrement, the NGFF `t` scale)."""
    first_time_point: int = Field(default=0, ge=0, le=10_000_000)
    """Which time point of its time-lapse `t = 0` is, when a time-lapse is stored as one
    image per time point (its time offset is `first_time_point * time_interval_s`)."""
    well: Well | None = None
    omero_project_id: int | None = Field(default=None, ge=1)
    """File the image in this existing OMERO project (its dataset named `dataset`), rather
    than the project named `project`; the server checks the policy by the project's name."""
    omero_dataset_id: int | None = Field(default=None, ge=1)
    """File the image in this existing OMERO dataset, whatever `project` and `dataset` say;
    the server checks the policy by the names of the dataset and its project."""

    @model_validator(mode="after")
    def _consistent(self) -> OpenManifest:
        indices = [p.index for p in self.positions]
        if sorted(indices) != list(range(len(indices))):
            raise ValueError("positions must carry the indices 0..n-1 exactly once")
        if self.channels and len(self.channels) != self.size_c:
            raise ValueError(f"{len(self.channels)} channel names for size_c={self.size_c}")
        if self.channel_colors and len(self.channel_colors) != self.size_c:
            raise ValueError(f"{len(self.channel_colors)} channel_colors for size_c={self.size_c}")
        return self

    def to_bytes(self) -> bytes:
        unset = {
            name
            for name in OPTIONAL_OPEN_FIELDS
            if getattr(self, name) == OpenManifest.model_fields[name].get_default()
        }
        return self.model_dump_json(exclude=unset).encode()

    @property
    def tile_bytes(self) -> int:
        return self.tile_width * self.tile_height * self.dtype.numpy.itemsize

    @property
    def tile_count(self) -> int:
        return len(self.positions) * self.size_z * self.size_c * self.size_t

    def tile_keys(self) -> list[TileKey]:
        """Every tile of the image, in acquisition order (position, then t, c, z)."""
        return [
            TileKey(p.index, z, c, t)
            for p in self.positions
            for t in range(self.size_t)
            for c in range(self.size_c)
            for z in range(self.size_z)
        ]

    def has_tile(self, key: TileKey) -> bool:
        return (
            0 <= key.index < len(self.positions)
            and 0 <= key.z < self.size_z
            and 0 <= key.c < self.size_c
            and 0 <= key.t < self.size_t
        )

    def channel_name(self, c: int) -> str:
        return self.channels[c] if self.channels else f"C{c}"

    def channel_color(self, c: int) -> str | None:
        return self.channel_colors[c] if self.channel_colors else None

    @property
    def time_offset_s(self) -> float:
        """Seconds from the time-lapse's start to this image's `t = 0` (planned)."""
        return self.first_time_point * (self.time_interval_s or 0.0)


class PlaneMeta(BaseModel):
    """What the acquisition measured when it took one tile (every field optional).

    The manifest holds the *planned* stage position of each tile; this is where the stage
    really was, and when and how long the camera exposed. Backends store it per plane
    (OME `Plane` PositionX/Y/Z, ExposureTime, DeltaT; OMERO PlaneInfo)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    x_um: float | None = Field(default=None, allow_inf_nan=False)
    y_um: float | None = Field(default=None, allow_inf_nan=False)
    z_um: float | None = Field(default=None, allow_inf_nan=False)
    """Measured stage position, µm."""
    exposure_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    delta_t_s: float | None = Field(default=None, allow_inf_nan=False)
    """Seconds from the manifest's `acquired_at` to this exposure."""


class TileDigest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tile: TileKey
    digest: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    """xxh3_128 of the tile's raw little-endian bytes, hex."""
    meta: PlaneMeta | None = None
    """What was measured when the tile was taken, if the acquisition said."""


class CloseManifest(_Message):
    """Says the device sent every tile of the image it will send; lists each tile's digest.

    Two ways an image ends with fewer tiles than its open declared, never to be confused:

    * `partial`: the acquisition ended early (stopped, or abandoned and closed by the agent's
      policy): planned tiles are missing; the server stores what `digests` lists and flags
      the image incomplete.
    * `not_planned`: positions the acquisition never planned (the grid cells outside a round
      or oval scan area): none of their tiles exist and none is missing, so an image whose
      every other tile is listed is complete, not flagged.

    Both are left out of the JSON while unset, so a receiver that predates them reads every
    full close unchanged. `check(open)` says whether a close fits its open manifest."""

    image_id: UUID
    tile_count: int = Field(ge=1)
    digests: tuple[TileDigest, ...]
    partial: bool = False
    not_planned: tuple[int, ...] = Field(default=(), max_length=100000)
    """Position indices never planned, ascending, each once."""

    @model_validator(mode="after")
    def _consistent(self) -> CloseManifest:
        if len(self.digests) != self.tile_count:
            raise ValueError(f"{len(self.digests)} digests for tile_count={self.tile_count}")
        if len({d.tile for d in self.digests}) != len(self.digests):
            raise ValueError("a tile is listed twice")
        if list(self.not_planned) != sorted(set(self.not_planned)) or any(
            i < 0 for i in self.not_planned
        ):
            raise ValueError("not_planned must be ascending position indices, each once")
        unplanned = set(self.not_planned)
        listed = next((d.tile for d in self.digests if d.tile.index in unplanned), None)
        if listed is not None:
            raise ValueError(f"tile {list(listed)} is listed, but its position is not_planned")
        return self

    def planned_keys(self, manifest: OpenManifest) -> list[TileKey]:
        """The open's tiles at planned positions, in acquisition order."""
        unplanned = set(self.not_planned)
        return [k for k in manifest.tile_keys() if k.index not in unplanned]

    def check(self, manifest: OpenManifest) -> str | None:
        """What makes this close contradict its open manifest (None: it fits)."""
        outside = [i for i in self.not_planned if i >= len(manifest.positions)]
        if outside:
            count = len(manifest.positions)
            return f"not_planned names position {outside[0]}, the open has {count}"
        planned = set(self.planned_keys(manifest))
        listed = {d.tile for d in self.digests}
        stray = next((k for k in listed if k not in planned), None)
        if stray is not None:
            return f"close lists tile {list(stray)}, which the open does not declare"
        if not self.partial and listed != planned:
            return (
                f"close lists {len(listed)} of the {len(planned)} planned tiles without "
                "partial: true (other tiles than open declared)"
            )
        if self.partial and listed == planned:
            return "a partial close lists every planned tile: send it as a full close"
        return None

    def shape(self) -> bytes:
        """A digest of what a repeated close must agree on: full or partial, the tiles
        listed, the positions never planned (their digests are checked tile by tile)."""
        text = json.dumps([self.partial, sorted(d.tile for d in self.digests), self.not_planned])
        return xxhash.xxh3_128_digest(text.encode())

    def planes(self) -> dict[TileKey, PlaneMeta]:
        """Measured metadata by tile, for the tiles that have any."""
        return {d.tile: d.meta for d in self.digests if d.meta is not None}

    def to_bytes(self) -> bytes:
        """JSON (`partial` and `not_planned` only when set), zstd-compressed when long (see
        `tilebridge_protocol.compressed`)."""
        unset = {"partial"} if not self.partial else set()
        if not self.not_planned:
            unset.add("not_planned")
        return maybe_compress(self.model_dump_json(exclude=unset or None).encode())


class TileState(StrEnum):
    COMMITTED = "committed"
    """The tile is durably staged on the server: the device may forget it."""
    RETRANSMIT = "retransmit"
    """Send the whole tile again (bad checksum, lost partial state)."""
    REJECTED = "rejected"
    """The tile will never be accepted as sent; `reason` says why."""


class ManifestState(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class ImageState(StrEnum):
    COMPLETE = "complete"
    """Every tile is stored in every configured backend; the device may forget the image."""
    FAILED = "failed"
    """A backend refused the image for good; the data stays staged on the server."""


class TileAck(_Message):
    kind: Literal["tile"] = "tile"
    image_id: UUID
    tile: TileKey
    state: TileState
    reason: ReasonCode | None = None
    detail: Text | None = None


class OpenAck(_Message):
    kind: Literal["open"] = "open"
    image_id: UUID
    state: ManifestState
    reason: ReasonCode | None = None
    detail: Text | None = None


class ImageAck(_Message):
    kind: Literal["image"] = "image"
    image_id: UUID
    state: ImageState
    locations: dict[str, str] = Field(default_factory=dict)
    """Backend name -> where the image is (a path, or e.g. `omero:Image:42 dataset:7`)."""
    digests: dict[str, Text] = Field(default_factory=dict)
    """Backend name -> the digest of the pixels it was verified to hold after writing
    (`sha1:<hex>`; several OMERO images of a `per_tile` image: comma-separated, in the order
    of their ids in `locations`). Left out while empty (added within v1)."""
    reason: ReasonCode | None = None
    detail: Text | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude=None if self.digests else {"digests"}).encode()


class ErrorAck(_Message):
    """Refusal of a message that names no image or tile the device could match."""

    kind: Literal["error"] = "error"
    image_id: UUID | None = None
    """The image the refused message seemed to be about, when that could be read."""
    reason: ReasonCode
    detail: Text
    topic: Text


class CreditAck(_Message):
    """The device's window: how many tile bytes it may have published and not yet seen
    committed, from now on (it replaces any earlier grant; a tile larger than the window
    still goes, alone). Retained on the device's ack topic, so a device learns its window on
    every (re)connect, also while no ingest runs."""

    kind: Literal["credit"] = "credit"
    window_bytes: int = Field(ge=0)


AnyAck = TileAck | OpenAck | ImageAck | ErrorAck | CreditAck
"""Every ack the ingest sends; `decode_ack` tells them apart by `kind`."""
Ack = Annotated[AnyAck, Field(discriminator="kind")]
_ACK = TypeAdapter[AnyAck](Ack)

M = TypeVar("M", bound=BaseModel)


def _load_json(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_JSON_BYTES:
        raise ProtocolError(ReasonCode.OVERSIZE, f"{len(payload)} bytes > {MAX_JSON_BYTES}")
    if is_compressed(payload):
        payload = decompress(payload)
    try:
        data = json.loads(payload)
    except RecursionError:  # e.g. b"[" * 100000: deep nesting is hostile, not JSON we use
        raise ProtocolError(ReasonCode.MALFORMED, "JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(ReasonCode.MALFORMED, f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ReasonCode.MALFORMED, "not a JSON object")
    version = data.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ReasonCode.UNSUPPORTED_VERSION, f"protocol version {version!r}")
    return data


def _validate(model: type[M] | TypeAdapter[Any], data: dict[str, Any], what: str) -> Any:
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(data)
        return model.model_validate(data)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg']}" for e in exc.errors()[:5]
        )
        reason = ReasonCode.INVALID_MANIFEST if what != "ack" else ReasonCode.MALFORMED
        raise ProtocolError(reason, f"{what}: {errors}") from None


def decode_open(payload: bytes) -> OpenManifest:
    return _validate(OpenManifest, _load_json(payload), "open")  # type: ignore[no-any-return]


def decode_close(payload: bytes) -> CloseManifest:
    return _validate(CloseManifest, _load_json(payload), "close")  # type: ignore[no-any-return]


def decode_ack(payload: bytes) -> AnyAck:
    return _validate(_ACK, _load_json(payload), "ack")  # type: ignore[no-any-return]


def utcnow() -> datetime:
    from datetime import UTC

    return datetime.now(UTC)
