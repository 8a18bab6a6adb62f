"""Claims: which instance holds a device (and an image store) while several share the work.

A claim is a row in the shared ledger with a holder and an expiry set by the ledger's clock
(`now() + lease`), so no two hosts' clocks are compared. An instance renews every claim it
holds in one statement; a claim whose holder stopped renewing may be taken by any other
instance after it expired. Two kinds:

* `device`: the holder is the one instance whose core handles the device's messages (the
  others relay them to it) and owns its images' lifecycles; docs/scale.md says why this keeps
  every guarantee of one instance under redelivery, reordering and an instance dying.
* `store`: one backend writing one image (an OMERO pyramid is written in one pass by one
  writer). Taken before the writer opens, released once it finished; a dead holder's store is
  taken over after its lease, and the new writer replaces the partial output (the storage
  contract: `open_image` replaces whatever a crashed attempt left).

`LocalClaims` is the single-host answer (everything is ours, nothing to renew): the SQLite
ledger's. The PostgreSQL one is `ledger/pg_claims.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

DEVICE = "device"
STORE = "store"


@dataclass(frozen=True, slots=True)
class Claim:
    holder: str
    valid_s: float
    """How much longer the claim runs, by the ledger's clock (inf: for ever)."""
    won: bool = False
    """This call made us the holder (it was nobody's, or its holder's lease had run out)."""


class Claims(ABC):
    """Claims of one instance (`me`). Thread-safe: the claims thread and the storer workers
    call it; every call is one short transaction."""

    me: str
    lease_s: float

    @abstractmethod
    def claim(self, kind: str, name: str) -> Claim:
        """Take or keep the claim if it is ours or free; else say who holds it."""

    @abstractmethod
    def renew(self) -> set[tuple[str, str]]:
        """Extend every claim we hold; returns them (kind, name). A claim missing from the
        answer was taken from us (we were frozen past its lease)."""

    @abstractmethod
    def release(self, kind: str, name: str) -> None: ...

    @abstractmethod
    def held(self) -> list[str]:
        """Devices claimed by us (also before a restart of this instance)."""

    @abstractmethod
    def orphans(self) -> list[str]:
        """Devices with images receiving or storing whose device claim is free or expired."""

    @property
    def shared(self) -> bool:
        """True if other instances may hold claims (so messages are routed and relayed)."""
        return True


class LocalClaims(Claims):
    """One instance alone: every claim is ours, for ever."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.lease_s = float("inf")

    def claim(self, kind: str, name: str) -> Claim:
        return Claim(self.me, float("inf"))

    def renew(self) -> set[tuple[str, str]]:
        return set()

    def release(self, kind: str, name: str) -> None:
        pass

    def held(self) -> list[str]:
        return []

    def orphans(self) -> list[str]:
        return []

    @property
    def shared(self) -> bool:
        return False


def store_name(device: str, image_id: object, backend: str) -> str:
    return f"{device}/{image_id}/{backend}"
