"""Tile identity: which camera frame (stage position) and which plane."""

from __future__ import annotations

from typing import NamedTuple


class TileKey(NamedTuple):
    """One camera frame: stage position `index` at plane (z, c, t).

    On the wire (JSON) it is the array `[index, z, c, t]`.
    """

    # `index` shadows tuple.index(); the stage position index is what the protocol calls it.
    index: int  # type: ignore[assignment]
    z: int = 0
    c: int = 0
    t: int = 0

    def slug(self) -> str:
        """A file-name-safe form, e.g. `12_0_1_0`."""
        return f"{self.index}_{self.z}_{self.c}_{self.t}"

    @classmethod
    def from_slug(cls, slug: str) -> TileKey:
        index, z, c, t = (int(part) for part in slug.split("_"))
        return cls(index, z, c, t)
