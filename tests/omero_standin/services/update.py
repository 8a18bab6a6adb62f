"""IUpdate: saving client graphs into the ModelStore."""

from __future__ import annotations

from typing import Any

import omero
import omero.api
import omero.model

from ..amd import servant
from ..model_store import fields_of, is_collection, kind_of
from .base import Service


@servant
class IUpdate(omero.api.IUpdate, Service):
    def __init__(self, server: Any, session: Any) -> None:
        Service.__init__(self, server, session)
        self.store = server.store

    def _save(self, obj: Any) -> Any:
        if obj is None:
            raise omero.ApiUsageException(message="cannot save null")
        return self.store.save(obj, self.actor())

    def _returned(self, sent: Any, stored: Any) -> Any:
        # A real server answers with the graph the client sent, now with ids.
        return self.store.copy_out(stored, _fetch_like(sent, set()))

    def saveObject(self, obj: Any, current: Any = None) -> None:
        self._save(obj)

    def saveAndReturnObject(self, obj: Any, current: Any = None) -> Any:
        return self._returned(obj, self._save(obj))

    def saveCollection(self, objs: Any, current: Any = None) -> None:
        for obj in objs or []:
            self._save(obj)

    def saveArray(self, graph: Any, current: Any = None) -> None:
        self.saveCollection(graph, current)

    def saveAndReturnArray(self, graph: Any, current: Any = None) -> list[Any]:
        return [self._returned(o, self._save(o)) for o in graph or []]

    def saveAndReturnIds(self, graph: Any, current: Any = None) -> list[int]:
        return [self._save(o)._id.val for o in graph or []]

    def deleteObject(self, row: Any, current: Any = None) -> None:
        # Like the real IUpdate.deleteObject: one object, refused while others point at it.
        # Whole images go through Delete2 (conn.deleteObjects / sf.submit).
        kind = kind_of(row)
        target = self.store.find(kind, row.id.val) if row is not None and row.id else None
        if target is None:
            raise omero.ValidationException(message=f"{kind}:{unwrap_id(row)} does not exist")
        self.check_write(kind, False)
        users = self.store.referrers(target)
        if users:
            names = ", ".join(f"{kind_of(u)}:{u._id.val}" for u in users[:5])
            raise omero.ValidationException(
                message=f"{kind}:{target._id.val} is still referenced by {names}; use Delete2"
            )
        self.store.delete(target)

    def indexObject(self, row: Any, current: Any = None) -> None:
        pass


def unwrap_id(obj: Any) -> Any:
    return obj.id.val if obj is not None and obj.id is not None else None


def _fetch_like(obj: Any, seen: set[int]) -> dict[str, Any]:
    seen.add(id(obj))
    tree: dict[str, Any] = {}
    for f in fields_of(obj):
        if is_collection(obj, f):
            items = getattr(obj, f"_{f}Seq", None) or []
            if getattr(obj, f"_{f}Loaded", False) and items:
                sub: dict[str, Any] = {}
                for item in items:
                    if id(item) not in seen:
                        sub.update(_fetch_like(item, seen))
                tree[f] = sub
            continue
        val = getattr(obj, "_" + f, None)
        if isinstance(val, omero.model.IObject) and val._loaded and id(val) not in seen:
            tree[f] = _fetch_like(val, seen)
    return tree
