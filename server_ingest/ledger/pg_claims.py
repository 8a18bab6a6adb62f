"""Claims in the shared PostgreSQL ledger (the model: server_ingest/claims.py).

Every statement is one short autocommit transaction; expiries use the database's clock, so
the hosts' clocks never meet. Taking a claim is one upsert that succeeds only if the claim is
ours already or its lease ran out; its `RETURNING` says whether we just won it.
"""

from __future__ import annotations

from psycopg_pool import ConnectionPool

from server_ingest.claims import DEVICE, Claim, Claims
from server_ingest.ledger.postgres import transient

_CLAIM = """
INSERT INTO claims AS c (kind, name, holder, expires, taken)
VALUES (%(kind)s, %(name)s, %(me)s, now() + %(lease)s * interval '1 second', now())
ON CONFLICT (kind, name) DO UPDATE
    SET holder = excluded.holder, expires = excluded.expires,
        taken = CASE WHEN c.holder = excluded.holder THEN c.taken ELSE excluded.taken END
    WHERE c.holder = excluded.holder OR c.expires < now()
RETURNING holder, extract(epoch FROM expires - now()), taken = now()
"""

_HOLDER = """
SELECT holder, extract(epoch FROM expires - now()) FROM claims WHERE kind = %s AND name = %s
"""

_ORPHANS = """
SELECT DISTINCT i.device FROM images i
LEFT JOIN claims c ON c.kind = 'device' AND c.name = i.device
WHERE i.phase IN ('receiving', 'storing') AND (c.holder IS NULL OR c.expires < now())
"""


class PostgresClaims(Claims):
    def __init__(self, pool: ConnectionPool, me: str, lease_s: float) -> None:
        self._pool = pool
        self.me = me
        self.lease_s = lease_s

    def claim(self, kind: str, name: str) -> Claim:
        args = {"kind": kind, "name": name, "me": self.me, "lease": self.lease_s}
        with transient("claims"), self._pool.connection() as db:
            row = db.execute(_CLAIM, args).fetchone()
            if row is not None:
                holder, valid, fresh = row
                return Claim(holder, float(valid), won=bool(fresh))
            row = db.execute(_HOLDER, (kind, name)).fetchone()
        if row is None:  # released between the two statements: ask again next time
            return Claim("", 0.0)
        return Claim(row[0], max(0.0, float(row[1])))

    def renew(self) -> set[tuple[str, str]]:
        with transient("claims"), self._pool.connection() as db:
            rows = db.execute(
                "UPDATE claims SET expires = now() + %s * interval '1 second' "
                "WHERE holder = %s RETURNING kind, name",
                (self.lease_s, self.me),
            ).fetchall()
        return {(kind, name) for kind, name in rows}

    def release(self, kind: str, name: str) -> None:
        with transient("claims"), self._pool.connection() as db:
            db.execute(
                "DELETE FROM claims WHERE kind = %s AND name = %s AND holder = %s",
                (kind, name, self.me),
            )

    def orphans(self) -> list[str]:
        with transient("claims"), self._pool.connection() as db:
            return [device for (device,) in db.execute(_ORPHANS).fetchall()]

    def held(self) -> list[str]:
        """Devices we hold (status, tests)."""
        with transient("claims"), self._pool.connection() as db:
            rows = db.execute(
                "SELECT name FROM claims WHERE kind = %s AND holder = %s ORDER BY name",
                (DEVICE, self.me),
            ).fetchall()
        return [name for (name,) in rows]
