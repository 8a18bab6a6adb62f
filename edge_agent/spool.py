"""The durable spool: every accepted frame, every experiment's state, and what to publish.

Everything the edge knows about an image lives here, so it survives `kill -9` between any
two calls and answers the same after a restart:

    spool.sqlite         images (the manifest, the experiment's stored spec, lifecycle,
                         server state), tiles (digest, PlaneMeta, pending/committed/...),
                         queue (what the publisher sends, in order). WAL, synchronous=FULL.
    tiles/<image_id>/<slug>.tile   raw little-endian pixels, held until the server
                         committed them and (for experiments with local targets) until
                         those targets finished
    rejected/<image_id>/ tiles the server refused for good, kept for a human to look at

A frame is accepted in one order: its file is written and fdatasynced, then its row and its
queue record are committed in one transaction (which also checks the experiment is still
acquiring). A crash in between leaves a file without a row; `recover()` removes it and the
frame was never accepted. Counts (per state, rejected included) are queries of the tiles
table: one source for every status.

Threads: any thread may call; each gets its own SQLite connection (SQLite serializes the
writers; no Python lock is held across I/O). Two calls writing the same tile at once are
serialized by a claim on that tile, so the second answers "already accepted" or 409.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from edge_agent.errors import ConflictError
from edge_agent.outbox import Outbox
from edge_agent.spooldb import (
    BufferStats,
    Counts,
    ImageRow,
    ImageState,
    Item,
    ServerState,
    meta_of,
)
from edge_agent.tilefiles import write_durably
from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.framing import tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    CloseManifest,
    OpenManifest,
    PlaneMeta,
    TileDigest,
    decode_close,
)
from tilebridge_runtime.durable import disk_errors, fsync_dir

__all__ = ["BufferStats", "Counts", "ImageRow", "ImageState", "Item", "ServerState", "Spool"]


class Spool(Outbox):
    """The whole spool: the acquisition's writes here, the publisher's in `Outbox`, the
    storage and the shared reads in `SpoolDB`."""

    def create(
        self, manifest: OpenManifest, record: dict[str, Any], to_server: bool, local_hold: bool
    ) -> bool:
        """Record a new image; False if it exists already (nothing changes then)."""
        self._check_space(64 * 1024)
        now = time.time()
        with self._db() as db:
            if db.execute(
                "SELECT 1 FROM images WHERE image_id = ?", (str(manifest.image_id),)
            ).fetchone():
                return False
            db.execute(
                "INSERT INTO images (image_id, manifest, record, to_server, local_hold, state,"
                " server, started_at) VALUES (?, ?, ?, ?, ?, 'acquiring', ?, ?)",
                (str(manifest.image_id), manifest.to_bytes(), json.dumps(record),
                 int(to_server), int(local_hold), "sending" if to_server else "off", now),
            )  # fmt: skip
            if to_server:
                self._enqueue(db, "open", manifest.image_id)
        self._notify()
        return True

    def add_tile(
        self,
        image_id: UUID,
        key: TileKey,
        data: bytes | bytearray | memoryview,
        meta: PlaneMeta | None = None,
    ) -> bool:
        """Make a tile durable and queue it; False if it was accepted before with the same
        pixels; ConflictError if with other pixels; PermanentError once the image no longer
        acquires; TransientError if the disk is full (nothing accepted then)."""
        manifest = self.manifest(image_id)
        if not manifest.has_tile(key):
            raise PermanentError(f"tile {tuple(key)} is not part of image {image_id}")
        if len(data) != manifest.tile_bytes:
            raise PermanentError(
                f"tile {tuple(key)} has {len(data)} bytes, expected {manifest.tile_bytes}"
            )
        digest = tile_digest(memoryview(data)).hex()
        with self._claim(image_id, key):
            before = self.accepted_digest(image_id, key)
            if before is not None:
                if before[0] == digest:
                    return False
                raise ConflictError(
                    "pixels",
                    f"tile {tuple(key)} of image {image_id} was accepted with other pixels "
                    f"(digest {before[0]}, these {digest}); the first exposure is kept",
                )
            self._require_acquiring(image_id)
            self._check_space(len(data))
            folder = self.tiles_dir / str(image_id)
            path = folder / f"{key.slug()}.tile"
            with disk_errors(f"buffering tile {tuple(key)}"):
                folder.mkdir(exist_ok=True)
                write_durably(path, data)
                fsync_dir(folder)
            try:
                self._commit_tile(image_id, key, digest, meta, len(data))
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        self._notify()
        return True

    def _commit_tile(
        self, image_id: UUID, key: TileKey, digest: str, meta: PlaneMeta | None, nbytes: int
    ) -> None:
        now = time.time()
        with self._db() as db:
            row = db.execute(
                "SELECT state, to_server, server, server_detail FROM images WHERE image_id = ?",
                (str(image_id),),
            ).fetchone()
            if row is None or row[0] != "acquiring":
                raise PermanentError(f"image {image_id} is {row and row[0]}; no more frames")
            if row[2] == "refused":
                raise PermanentError(f"the server refused image {image_id}: {row[3]}")
            db.execute(
                "INSERT INTO tiles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                (str(image_id), *key, digest, meta.model_dump_json() if meta else None, nbytes,
                 "pending" if row[1] else "local", now),
            )  # fmt: skip
            if row[1]:
                self._enqueue(db, "tile", image_id, key, nbytes, digest)
            db.execute(
                "UPDATE images SET last_frame_at = ? WHERE image_id = ?", (now, str(image_id))
            )

    def _require_acquiring(self, image_id: UUID) -> None:
        rows = self._read("SELECT state FROM images WHERE image_id = ?", str(image_id))
        state = rows[0][0] if rows else "unknown"
        if state != "acquiring":
            raise PermanentError(f"experiment {image_id} is {state}; no more frames")

    def close_image(
        self,
        image_id: UUID,
        *,
        partial: bool = False,
        not_planned: Collection[int] = (),
        ended_by: str | None = None,
    ) -> CloseManifest | None:
        """acquiring -> finalizing, atomically with the close manifest (queued when the image
        streams to the server). Without `partial` every tile must have been accepted, but
        those at the `not_planned` positions (never planned: a round scan area's empty grid
        cells), which must have none. None when there is nothing to close (a partial image
        without a single frame)."""
        manifest = self.manifest(image_id)
        unplanned = sorted(set(not_planned))
        if unplanned and not 0 <= unplanned[0] <= unplanned[-1] < len(manifest.positions):
            raise PermanentError(
                f"not_planned: positions are 0..{len(manifest.positions) - 1}, not {unplanned}"
            )
        with self._db() as db:
            row = db.execute(
                "SELECT state, to_server, close, local_hold FROM images WHERE image_id = ?",
                (str(image_id),),
            ).fetchone()
            hold = bool(row[3])
            if row[0] != "acquiring":
                return decode_close(bytes(row[2])) if row[2] else None
            tiles = {
                TileKey(*r[:4]): (r[4], r[5])
                for r in db.execute(
                    "SELECT idx, z, c, t, digest, meta FROM tiles WHERE image_id = ?",
                    (str(image_id),),
                )
            }
            taken = next((k for k in tiles if k.index in set(unplanned)), None)
            if taken is not None:
                raise PermanentError(
                    f"not_planned: position {taken.index} has frames (tile_index="
                    f"{taken.index} z_index={taken.z} channel_index={taken.c}): it was planned"
                )
            planned = [k for k in manifest.tile_keys() if k.index not in set(unplanned)]
            keys = [k for k in planned if k in tiles]
            missing = len(planned) - len(keys)
            if missing and not partial:
                first = next(k for k in planned if k not in tiles)
                raise PermanentError(
                    f"cannot finalize {manifest.experiment}: {missing} of {len(planned)}"
                    f" frames not written (first: tile_index={first.index} z_index={first.z} "
                    f"channel_index={first.c} time_index={first.t}); finalize with partial "
                    "to close it with the frames it has"
                )
            close = None
            if keys:
                close = CloseManifest(
                    image_id=image_id,
                    tile_count=len(keys),
                    digests=tuple(
                        TileDigest(tile=k, digest=tiles[k][0], meta=meta_of(tiles[k][1]))
                        for k in keys
                    ),
                    partial=bool(missing),
                    not_planned=tuple(unplanned),
                )
            # Local targets still have to finish their files; without any it is done now.
            state = ("finalizing" if hold else "finalized") if close else "aborted"
            db.execute(
                "UPDATE images SET state = ?, close = ?, partial = ?, ended_by = ?"
                " WHERE image_id = ?",
                (state, close.to_bytes() if close else None, int(bool(missing)), ended_by,
                 str(image_id)),
            )  # fmt: skip
            if close is None:  # not a single frame: nothing to keep, nothing more to send
                db.execute(
                    "UPDATE images SET done_at = ?, local_hold = 0 WHERE image_id = ?",
                    (time.time(), str(image_id)),
                )
                db.execute("DELETE FROM queue WHERE image_id = ?", (str(image_id),))
            refused = db.execute(
                "SELECT server = 'refused' FROM images WHERE image_id = ?", (str(image_id),)
            ).fetchone()[0]
            if close is not None and row[1] and not refused:
                self._enqueue(db, "close", image_id)
        self._notify()
        return close

    def rejected(self) -> list[tuple[UUID, int, str | None]]:
        """Images with tiles set aside in `rejected/`: (image_id, tiles, the server's word)."""
        rows = self._read(
            "SELECT t.image_id, COUNT(*), i.server_detail FROM tiles t JOIN images i"
            " USING (image_id) WHERE t.state = 'rejected' GROUP BY t.image_id"
        )
        return [(UUID(r[0]), int(r[1]), r[2]) for r in rows]

    def resend_rejected(self, image_id: UUID) -> int:
        """An admin fixed what made the server refuse: the set-aside tiles go back into the
        buffer as pending and the image is queued again (open, its tiles, its close), as if
        it had never been sent. Only while no agent runs on this spool. Returns the tiles."""
        folder = self.rejected_dir / str(image_id)
        files = {p.stem: p for p in folder.glob("*.tile")} | {
            p.stem: p for p in folder.glob("tiles/*.tile")
        }
        target = self.tiles_dir / str(image_id)
        with self._db() as db:
            rows = db.execute(
                "SELECT idx, z, c, t, nbytes, digest FROM tiles WHERE image_id = ?"
                " AND state = 'rejected'",
                (str(image_id),),
            ).fetchall()
            back = [r for r in rows if TileKey(*r[:4]).slug() in files]
            if not back:
                return 0
            target.mkdir(parents=True, exist_ok=True)
            for r in back:
                os.replace(files[TileKey(*r[:4]).slug()], target / f"{TileKey(*r[:4]).slug()}.tile")
            fsync_dir(target)
            db.execute(
                "UPDATE images SET server = 'sending', server_detail = NULL, done_at = NULL"
                " WHERE image_id = ?",
                (str(image_id),),
            )
            self._enqueue(db, "open", image_id)
            for idx, z, c, t, nbytes, digest in back:
                db.execute(
                    "UPDATE tiles SET state = 'pending', reason = NULL WHERE image_id = ?"
                    " AND idx = ? AND z = ? AND c = ? AND t = ?",
                    (str(image_id), idx, z, c, t),
                )
                self._enqueue(db, "tile", image_id, TileKey(idx, z, c, t), nbytes, digest)
            closed = db.execute(
                "SELECT close IS NOT NULL FROM images WHERE image_id = ?", (str(image_id),)
            ).fetchone()[0]
            if closed:
                self._enqueue(db, "close", image_id)
        with open(folder / "reasons.log", "a") as log:
            log.write(f"{time.time():.3f} resent {len(back)} tiles by an administrator\n")
        self._notify()
        return len(back)

    def set_state(self, image_id: UUID, state: ImageState) -> None:
        with self._db() as db:
            db.execute("UPDATE images SET state = ? WHERE image_id = ?", (state, str(image_id)))

    def set_target(self, image_id: UUID, label: str, progress: dict[str, Any]) -> None:
        """Record a local target's final state (finished / failed), kept across restarts."""
        with self._db() as db:
            (raw,) = db.execute(
                "SELECT targets FROM images WHERE image_id = ?", (str(image_id),)
            ).fetchone()
            targets = json.loads(raw) | {label: progress}
            db.execute(
                "UPDATE images SET targets = ? WHERE image_id = ?",
                (json.dumps(targets), str(image_id)),
            )

    def abort(self, image_id: UUID, ended_by: str | None = None) -> None:
        """Drop what the Pi holds of the image: unsent tiles and queue records."""
        with self._db() as db:
            db.execute(
                "UPDATE images SET state = 'aborted', ended_by = ?, local_hold = 0,"
                " done_at = COALESCE(done_at, ?) WHERE image_id = ?",
                (ended_by, time.time(), str(image_id)),
            )
            db.execute("DELETE FROM queue WHERE image_id = ?", (str(image_id),))
        shutil.rmtree(self.tiles_dir / str(image_id), ignore_errors=True)

    def release_local(self, image_id: UUID) -> None:
        """The local targets are done: tile files the server has no more need of go."""
        with self._db() as db:
            db.execute("UPDATE images SET local_hold = 0 WHERE image_id = ?", (str(image_id),))
            db.execute(
                "UPDATE images SET done_at = ? WHERE image_id = ? AND done_at IS NULL"
                " AND (to_server = 0 OR server IN ('complete', 'failed', 'refused'))",
                (time.time(), str(image_id)),
            )
            gone = db.execute(
                "SELECT idx, z, c, t FROM tiles WHERE image_id = ? AND state != 'pending'",
                (str(image_id),),
            ).fetchall()
        for key in gone:
            self.tile_path(image_id, TileKey(*key)).unlink(missing_ok=True)

    @contextmanager
    def _claim(self, image_id: UUID, key: TileKey) -> Iterator[None]:
        """Only one call writes a given tile at a time; a second one waits for the first."""
        while True:
            with self._lock:
                busy = self._claims.get((image_id, key))
                if busy is None:
                    mine = self._claims[(image_id, key)] = threading.Event()
                    break
            busy.wait()
        try:
            yield
        finally:
            with self._lock:
                del self._claims[(image_id, key)]
            mine.set()
