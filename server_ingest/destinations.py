"""Which backends an image is written to: every local backend (the archive, file formats)
and at most one OMERO target, chosen by the first route whose patterns match the image's
device, experiment and project. Pure: no I/O, no threads.

    "omero_targets": {"facility": {...}, "lab-b": {...}},
    "routes": [
      {"device": "scope-b*", "target": "lab-b"},
      {"project": "Lab B *", "target": "lab-b"},
      {"target": "facility"}
    ]

Patterns are shell-style (`fnmatch`, case-sensitive), `*` when left out. With one OMERO
target and no routes, every image goes to it. An image no route matches is refused by the
storer with a reason (`storage_failed: no OMERO route ...`): a gap in the routes is a
configuration error an administrator fixes, then `server-ingest images retry`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from tilebridge_protocol.messages import OpenManifest


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(min_length=1)
    """The name of an entry of `omero_targets`."""
    device: str = "*"
    experiment: str = "*"
    project: str = "*"

    def matches(self, device: str, manifest: OpenManifest) -> bool:
        return (
            fnmatch.fnmatchcase(device, self.device)
            and fnmatch.fnmatchcase(manifest.experiment, self.experiment)
            and fnmatch.fnmatchcase(manifest.project, self.project)
        )


@dataclass(frozen=True)
class Routed:
    backends: tuple[str, ...]
    """Names of the backends this image is written to."""
    target: str
    """The OMERO target ('' for none): images of one target share its storer workers, so a
    target that is down holds up only its own images."""
    problem: str | None = None
    """Why the image cannot be routed (then it is written nowhere and fails)."""


class Destinations:
    def __init__(
        self, local: Sequence[str], targets: Sequence[str], routes: Sequence[Route] = ()
    ) -> None:
        self.local = tuple(local)
        self.targets = tuple(targets)
        self.routes = tuple(routes)
        unknown = sorted({r.target for r in self.routes} - set(self.targets))
        if unknown:
            raise ValueError(f"routes name unknown OMERO targets {unknown}; known: {self.targets}")

    def route(self, device: str, manifest: OpenManifest) -> Routed:
        if not self.targets:
            return Routed(self.local, "")
        if not self.routes and len(self.targets) == 1:
            return Routed((*self.local, self.targets[0]), self.targets[0])
        for route in self.routes:
            if route.matches(device, manifest):
                return Routed((*self.local, route.target), route.target)
        return Routed(
            self.local,
            "",
            f"no OMERO route for device {device}, experiment {manifest.experiment!r}, "
            f"project {manifest.project!r}: add one to `routes` (or a catch-all), then retry",
        )
