"""ServiceFactory.submit: Delete2 (what BlitzGateway.deleteObjects sends) and its Handle.

The command runs at once; the Handle just reports the result, so omero.callbacks.CmdCallbackI
finds it on its first poll and the stand-in never needs to call the client back.
"""

from __future__ import annotations

import time
from typing import Any

import omero
import omero.cmd

from ..amd import servant
from ..model_store import kind_of
from .base import Service

# what a Delete2 of the key class takes along (collections of it, then their targets)
_LINK_COLLECTIONS = {
    "Project": ["datasetLinks", "annotationLinks"],
    "Dataset": ["projectLinks", "imageLinks", "annotationLinks"],
    "Image": ["datasetLinks", "annotationLinks"],
}
_CHILDREN = {"Project": ("datasetLinks", "Dataset"), "Dataset": ("imageLinks", "Image")}


class _Deleter:
    def __init__(self, service: Service, exclude: set[str]) -> None:
        self.service = service
        self.store = service.server.store
        self.exclude = exclude
        self.deleted: dict[str, list[int]] = {}
        self.pixels_ids: list[int] = []

    def _drop(self, obj: Any) -> None:
        kind = kind_of(obj)
        self.service.check_write(kind, False)
        self.store.delete(obj)
        self.deleted.setdefault(_api_name(kind), []).append(obj._id.val)

    def delete(self, obj: Any) -> None:
        if self.store.get(kind_of(obj), obj._id.val) is None:
            return  # already taken along
        kind = kind_of(obj)
        if isinstance(obj, omero.model.Annotation):
            for user in self.store.referrers(obj):
                if kind_of(user).endswith("AnnotationLink"):
                    self._drop(user)
            self._drop(obj)
            return
        children: list[Any] = []
        if kind in _CHILDREN:
            coll, child_kind = _CHILDREN[kind]
            if child_kind not in self.exclude:
                children = [
                    self.store.resolve(link._child) for link in self.store.collection(obj, coll)
                ]
        for coll in _LINK_COLLECTIONS.get(kind, []):
            for link in self.store.collection(obj, coll):
                target = self.store.resolve(link._child) if coll == "annotationLinks" else None
                self._drop(link)
                if target is not None and self._orphan_annotation(target):
                    self.delete(target)
        if kind == "Image":
            for pixels in self.store.collection(obj, "pixels"):
                for channel in self.store.collection(pixels, "channels"):
                    for ref in (channel._logicalChannel, channel._statsInfo):
                        target = self.store.resolve(ref)
                        if target is not None:
                            self._drop(target)
                    self._drop(channel)
                self.pixels_ids.append(pixels._id.val)
                self._drop(pixels)
        for child in children:
            # Only children that no other container still holds go with their parent.
            if child is not None and not self._still_linked(child):
                self.delete(child)
        leftovers = self.store.referrers(obj) if self.store.get(kind, obj._id.val) else []
        if leftovers:
            names = ", ".join(f"{kind_of(u)}:{u._id.val}" for u in leftovers[:5])
            raise omero.ValidationException(message=f"{kind}:{obj._id.val} still used by {names}")
        self._drop(obj)

    def _orphan_annotation(self, ann: Any) -> bool:
        if kind_of(ann) in self.exclude:
            return False
        return not any(kind_of(u).endswith("AnnotationLink") for u in self.store.referrers(ann))

    def _still_linked(self, child: Any) -> bool:
        coll = "projectLinks" if kind_of(child) == "Dataset" else "datasetLinks"
        return bool(self.store.collection(child, coll))


def _api_name(kind: str) -> str:
    # Delete2Response names classes the way the server's Java model does.
    if "Annotation" in kind:
        package = "annotations"
    elif kind in ("Project", "Dataset", "ProjectDatasetLink", "DatasetImageLink"):
        package = "containers"
    elif kind == "StatsInfo":
        package = "stats"
    else:
        package = "core"
    return f"ome.model.{package}.{kind}"


def run_request(service: Service, req: Any) -> Handle:
    started = int(time.time() * 1000)
    if not isinstance(req, omero.cmd.Delete2):
        rsp: Any = omero.cmd.ERR(
            category="standin", name="unsupported-request",
            parameters={"message": f"the stand-in runs only Delete2, not {type(req).__name__}"},
        )  # fmt: skip
        return Handle(service, req, rsp, started)
    exclude: set[str] = set()
    for option in req.childOptions or []:
        exclude.update(option.excludeType or [])
    deleter = _Deleter(service, exclude)
    store = service.server.store
    try:
        with store.transaction():
            for class_name, ids in (req.targetObjects or {}).items():
                for obj_id in ids:
                    obj = store.find(class_name, obj_id)
                    if obj is None:
                        raise omero.ValidationException(message=f"{class_name}:{obj_id} not found")
                    deleter.delete(obj)
            if req.dryRun:
                raise _DryRunDoneError()
    except _DryRunDoneError:
        pass
    except omero.ServerError as exc:
        rsp = omero.cmd.ERR(
            category="graph", name=type(exc).__name__, parameters={"message": exc.message}
        )
        return Handle(service, req, rsp, started)
    if not req.dryRun:
        for pixels_id in deleter.pixels_ids:
            service.server.repository.delete(pixels_id)
    rsp = omero.cmd.Delete2Response(deletedObjects=deleter.deleted)
    return Handle(service, req, rsp, started)


class _DryRunDoneError(Exception):
    pass


@servant
class Handle(omero.cmd.Handle, Service):
    def __init__(self, service: Service, req: Any, rsp: Any, started: int) -> None:
        Service.__init__(self, service.server, service.session)
        self.req = req
        self.rsp = rsp
        failed = isinstance(rsp, omero.cmd.ERR)
        self.status = omero.cmd.Status(
            category="", name="", flags=[omero.cmd.State.FAILURE] if failed else [],
            parameters={}, currentStep=1, steps=1, startTime=started,
            stepStartTimes=[started], stepStopTimes=[started], stopTime=int(time.time() * 1000),
        )  # fmt: skip

    def addCallback(self, cb: Any, current: Any = None) -> None:
        pass  # CmdCallbackI polls once and finds the response

    def removeCallback(self, cb: Any, current: Any = None) -> None:
        pass

    def getRequest(self, current: Any = None) -> Any:
        return self.req

    def getResponse(self, current: Any = None) -> Any:
        return self.rsp

    def getStatus(self, current: Any = None) -> Any:
        return self.status

    def cancel(self, current: Any = None) -> bool:
        return False

    def close(self, current: Any = None) -> None:
        for name, servant_ in list(self.session.servants.items()):
            if servant_ is self:
                del self.session.servants[name]
