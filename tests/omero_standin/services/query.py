"""IQuery over the ModelStore; HQL shapes are those of ..hql."""

from __future__ import annotations

from typing import Any

import omero
import omero.api
from omero.rtypes import unwrap

from ..amd import servant
from ..hql import QueryEngine
from ..model_store import kind_of
from .base import Service


@servant
class IQuery(omero.api.IQuery, Service):
    def __init__(self, server: Any, session: Any) -> None:
        Service.__init__(self, server, session)
        self.store = server.store
        self.engine = QueryEngine(server.store)

    def get(self, klass: str, id: int, current: Any = None) -> Any:
        obj = self.store.find(klass, id)
        if obj is None:
            raise omero.ValidationException(
                message=f"No row with the given identifier exists: [{klass}#{id}]"
            )
        return self.store.copy_out(obj)

    def find(self, klass: str, id: int, current: Any = None) -> Any:
        obj = self.store.find(klass, id)
        return None if obj is None else self.store.copy_out(obj)

    def findAll(self, klass: str, filter: Any, current: Any = None) -> list[Any]:
        objs = sorted(self.store.all_of(klass), key=lambda o: o._id.val)
        return self.store.copies(_page(objs, filter))

    def findByString(self, klass: str, field: str, value: str, current: Any = None) -> Any:
        hits = self._by_string(klass, field, value, True)
        if len(hits) > 1:
            raise omero.ValidationException(message=f"{len(hits)} {klass} have {field}={value!r}")
        return self.store.copy_out(hits[0]) if hits else None

    def findAllByString(
        self, klass: str, field: str, value: str, caseSensitive: bool, filter: Any,
        current: Any = None,
    ) -> list[Any]:  # fmt: skip
        return self.store.copies(_page(self._by_string(klass, field, value, caseSensitive), filter))

    def _by_string(self, klass: str, field: str, value: str, case: bool) -> list[Any]:
        def norm(v: Any) -> Any:
            return v if case or not isinstance(v, str) else v.lower()

        want = norm(value)
        hits = [
            o
            for o in self.store.all_of(klass)
            if norm(unwrap(getattr(o, "_" + field, None))) == want
        ]
        return sorted(hits, key=lambda o: o._id.val)

    def findByQuery(self, query: str, params: Any, current: Any = None) -> Any:
        hits = self.engine.objects(query, params)
        if len(hits) > 1:
            raise omero.ValidationException(
                message=f"findByQuery found {len(hits)} results; use findAllByQuery: {query}"
            )
        return hits[0] if hits else None

    def findAllByQuery(self, query: str, params: Any, current: Any = None) -> list[Any]:
        return self.engine.objects(query, params)

    def projection(self, query: str, params: Any, current: Any = None) -> list[list[Any]]:
        return self.engine.projection(query, params)

    def refresh(self, iObject: Any, current: Any = None) -> Any:
        return self.get(kind_of(iObject), iObject.id.val, current)


def _page(objs: list[Any], filter: Any) -> list[Any]:
    if filter is None:
        return objs
    offset = unwrap(filter.offset) or 0
    limit = unwrap(filter.limit)
    return objs[offset:] if limit is None else objs[offset : offset + limit]
