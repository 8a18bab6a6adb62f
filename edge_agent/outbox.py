"""The publisher's side of the spool: what to send next, and what the server's answers
change (committed, rejected, refused, done); plus start-up recovery and retention."""

from __future__ import annotations

import json
import os
import shutil
import time
from uuid import UUID

from edge_agent.spooldb import Item, SpoolDB
from tilebridge_protocol.keys import TileKey


class Outbox(SpoolDB):
    def next_item(self, after: int, timeout: float) -> Item | None:
        """The first queue record after `after` (a seq); waits up to `timeout` for one."""
        deadline = time.monotonic() + timeout
        while True:
            rows = (
                self._connection(relaxed=True)
                .execute(
                    "SELECT seq, kind, image_id, idx, z, c, t, nbytes, digest, enqueued_at"
                    " FROM queue WHERE seq > ? ORDER BY seq LIMIT 1",
                    (after,),
                )
                .fetchall()
            )
            if rows:
                seq, kind, image, idx, z, c, t, nbytes, digest, at = rows[0]
                key = TileKey(idx, z, c, t) if kind == "tile" else None
                return Item(seq, kind, UUID(image), key, nbytes, at,
                            bytes.fromhex(digest) if digest else None)  # fmt: skip
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with self._queued:
                self._queued.wait(remaining)

    def payload(self, item: Item) -> bytes:
        """The JSON of an open / close record."""
        column = "manifest" if item.kind == "open" else "close"
        rows = self._read(f"SELECT {column} FROM images WHERE image_id = ?", str(item.image_id))
        if not rows or rows[0][0] is None:
            raise FileNotFoundError(f"{item.kind} of {item.image_id}")
        return bytes(rows[0][0])

    def drop(self, item: Item) -> None:
        with self._db(relaxed=True) as db:
            db.execute("DELETE FROM queue WHERE seq = ?", (item.seq,))

    def tile_committed(self, image_id: UUID, key: TileKey) -> bool:
        """The server has the tile: forget its bytes (unless local targets still need them).
        False if it was not pending (a repeated ack)."""
        where = "image_id = ? AND idx = ? AND z = ? AND c = ? AND t = ?"
        with self._db(relaxed=True) as db:
            changed = db.execute(
                f"UPDATE tiles SET state = 'committed' WHERE {where} AND state = 'pending'",
                (str(image_id), *key),
            ).rowcount
            db.execute(f"DELETE FROM queue WHERE kind = 'tile' AND {where}", (str(image_id), *key))
            hold = db.execute(
                "SELECT local_hold FROM images WHERE image_id = ?", (str(image_id),)
            ).fetchone()
        if changed and not (hold and hold[0]):
            self.tile_path(image_id, key).unlink(missing_ok=True)
        return bool(changed)

    def tile_rejected(self, item: Item, reason: str) -> None:
        assert item.key is not None
        with self._db(relaxed=True) as db:
            db.execute(
                "UPDATE tiles SET state = 'rejected', reason = ? WHERE image_id = ? AND idx = ?"
                " AND z = ? AND c = ? AND t = ?",
                (reason, str(item.image_id), *item.key),
            )
            db.execute("DELETE FROM queue WHERE seq = ?", (item.seq,))
        source = self.tile_path(item.image_id, item.key)
        target = self.rejected_dir / str(item.image_id)
        target.mkdir(parents=True, exist_ok=True)
        if source.exists():
            os.replace(source, target / source.name)
        with open(target / "reasons.log", "a") as log:
            log.write(f"{time.time():.3f} tile {item.key.slug()} {reason}\n")

    def image_refused(self, image_id: UUID, reason: str) -> int:
        """The server refused the whole image: set it aside; returns the tiles refused."""
        with self._db(relaxed=True) as db:
            refused = db.execute(
                "UPDATE tiles SET state = 'rejected', reason = ? WHERE image_id = ?"
                " AND state = 'pending'",
                (reason, str(image_id)),
            ).rowcount
            db.execute(
                "UPDATE images SET server = 'refused', server_detail = ?,"
                " done_at = COALESCE(done_at, ?) WHERE image_id = ?",
                (reason, time.time(), str(image_id)),
            )
            db.execute("DELETE FROM queue WHERE image_id = ?", (str(image_id),))
        source = self.tiles_dir / str(image_id)
        target = self.rejected_dir / str(image_id)
        target.mkdir(parents=True, exist_ok=True)
        if source.exists():
            os.replace(source, target / "tiles")
        with open(target / "reasons.log", "a") as log:
            log.write(f"{time.time():.3f} image {reason}\n")
        return int(refused)

    def image_done(
        self, image_id: UUID, complete: bool, detail: str | None, locations: dict[str, str]
    ) -> None:
        """The server answered the image (complete, or failed for good)."""
        with self._db(relaxed=True) as db:
            db.execute(
                "UPDATE images SET server = ?, server_detail = ?, locations = ?,"
                " done_at = CASE WHEN local_hold = 0 THEN COALESCE(done_at, ?) END"
                " WHERE image_id = ?",
                ("complete" if complete else "failed", detail, json.dumps(locations),
                 time.time(), str(image_id)),
            )  # fmt: skip
            db.execute("DELETE FROM queue WHERE image_id = ?", (str(image_id),))
            hold = db.execute(
                "SELECT local_hold FROM images WHERE image_id = ?", (str(image_id),)
            ).fetchone()
        if hold is not None and not hold[0]:
            shutil.rmtree(self.tiles_dir / str(image_id), ignore_errors=True)

    def recover(self) -> int:
        """At start-up: remove tile files no committed row owns (a crash between the file
        and its row). Returns how many."""
        known = {
            (r[0], TileKey(*r[1:]).slug())
            for r in self._read("SELECT image_id, idx, z, c, t FROM tiles")
        }
        stray = 0
        for path in self.tiles_dir.glob("*/*.tile"):
            if (path.parent.name, path.stem) not in known:
                path.unlink(missing_ok=True)
                stray += 1
        return stray

    def purge(self, retention_s: float) -> int:
        """Forget images done longer than `retention_s` ago; returns how many."""
        cutoff = time.time() - retention_s
        with self._db(relaxed=True) as db:
            old = [r[0] for r in db.execute(
                "SELECT image_id FROM images WHERE done_at IS NOT NULL AND done_at < ?", (cutoff,)
            )]  # fmt: skip
            for image_id in old:
                db.execute("DELETE FROM tiles WHERE image_id = ?", (image_id,))
                db.execute("DELETE FROM images WHERE image_id = ?", (image_id,))
        with self._lock:
            for image_id in old:
                self._manifests.pop(UUID(image_id), None)
        for image_id in old:
            shutil.rmtree(self.tiles_dir / image_id, ignore_errors=True)
        return len(old)
