"""The stand-in's database: omero.model objects by class and id.

Stored objects are kept flat: every reference is an unloaded proxy (``ImageI(5, False)``) and
collections are not stored at all but derived from the objects that point back (links,
Pixels -> Image, Channel -> Pixels). That keeps one truth per relation, and lets queries return
exactly the graph they fetched, like Hibernate does, instead of everything reachable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import omero
import omero.model
from omero.rtypes import rlong, rtime

# (owner class, collection) -> (element class, the element's field that points at the owner)
COLLECTIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("Project", "datasetLinks"): ("ProjectDatasetLink", "parent"),
    ("Project", "annotationLinks"): ("ProjectAnnotationLink", "parent"),
    ("Dataset", "projectLinks"): ("ProjectDatasetLink", "child"),
    ("Dataset", "imageLinks"): ("DatasetImageLink", "parent"),
    ("Dataset", "annotationLinks"): ("DatasetAnnotationLink", "parent"),
    ("Image", "datasetLinks"): ("DatasetImageLink", "child"),
    ("Image", "annotationLinks"): ("ImageAnnotationLink", "parent"),
    ("Image", "pixels"): ("Pixels", "image"),
    ("Pixels", "channels"): ("Channel", "pixels"),
    ("Annotation", "annotationLinks"): ("AnnotationAnnotationLink", "parent"),
}

ENUMERATIONS: dict[str, list[str]] = {
    "PixelsType": ["bit", "int8", "int16", "int32", "uint8", "uint16", "uint32", "float", "double"],
    "DimensionOrder": ["XYZCT", "XYZTC", "XYCTZ", "XYCZT", "XYTCZ", "XYTZC"],
}

Key = tuple[str, int]


def kind_of(obj: Any) -> str:
    """'ImageI' -> 'Image': the class name HQL and graph requests use."""
    name = type(obj).__name__
    return name[:-1] if name.endswith("I") else name


def model_class(name: str) -> type:
    cls = getattr(omero.model, name, None)
    if not isinstance(cls, type) or not issubclass(cls, omero.model.IObject):
        raise omero.ApiUsageException(message=f"unknown model class {name!r}")
    return cls


def is_collection(obj: Any, field: str) -> bool:
    return hasattr(obj, f"_{field}Seq")


def fields_of(obj: Any) -> list[str]:
    return [f for f in type(obj)._field_info._fields if f != "details"]


@dataclass
class Actor:
    """Who writes, and the hook that may forbid it (raises omero.SecurityViolation)."""

    user_id: int
    group_id: int
    check_write: Callable[[str, bool], None]


class ModelStore:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._objects: dict[Key, Any] = {}
        self._next_id: dict[str, int] = {}
        for kind, values in ENUMERATIONS.items():
            for value in values:
                obj = model_class(kind + "I")()
                obj.setValue(omero.rtypes.rstring(value))
                self.insert(obj)

    # -- basic access --------------------------------------------------------------------
    def _table(self, kind: str) -> str:
        # All annotation subclasses share one id sequence, as they share one table.
        return "Annotation" if kind.endswith("Annotation") else kind

    def insert(self, obj: Any, actor: Actor | None = None) -> Any:
        """Give a new, flat object an id and keep it."""
        with self.lock:
            kind = kind_of(obj)
            table = self._table(kind)
            new_id = self._next_id.get(table, 0) + 1
            self._next_id[table] = new_id
            obj.setId(rlong(new_id))
            obj._loaded = True
            details = omero.model.DetailsI()
            if actor is not None:
                details._owner = omero.model.ExperimenterI(actor.user_id, False)
                details._group = omero.model.ExperimenterGroupI(actor.group_id, False)
            details._permissions = omero.model.PermissionsI("rwr---")
            event = omero.model.EventI(new_id, True)
            event._time = rtime(int(time.time() * 1000))
            details._creationEvent = event
            obj._details = details
            self._objects[(kind, new_id)] = obj
            return obj

    def get(self, kind: str, obj_id: int) -> Any | None:
        with self.lock:
            return self._objects.get((kind, obj_id))

    def find(self, class_name: str, obj_id: int) -> Any | None:
        """By class name or any superclass name ('Annotation' finds a MapAnnotation)."""
        cls = model_class(class_name)
        with self.lock:
            exact = self._objects.get((class_name, obj_id))
            if exact is not None:
                return exact
            for (_, oid), obj in self._objects.items():
                if oid == obj_id and isinstance(obj, cls):
                    return obj
        return None

    def all_of(self, class_name: str) -> list[Any]:
        cls = model_class(class_name)
        with self.lock:
            return [o for o in self._objects.values() if isinstance(o, cls)]

    def resolve(self, ref: Any) -> Any | None:
        if ref is None or ref._id is None:
            return None
        return self.find(kind_of(ref), ref._id.val)

    @staticmethod
    def ref(obj: Any) -> Any:
        return type(obj)(obj._id.val, False)

    def collection(self, owner: Any, field: str) -> list[Any]:
        spec = None
        for (owner_class, coll), value in COLLECTIONS.items():
            if coll == field and isinstance(owner, model_class(owner_class)):
                spec = value
                break
        if spec is None:
            raise omero.ApiUsageException(
                message=f"the stand-in does not track {kind_of(owner)}.{field}"
            )
        element_class, back = spec
        oid = owner._id.val
        items = [
            o
            for o in self.all_of(element_class)
            if getattr(o, "_" + back, None) is not None
            and getattr(o, "_" + back)._id.val == oid
            and isinstance(owner, model_class(kind_of(getattr(o, "_" + back))))
        ]
        return sorted(items, key=lambda o: o._id.val)

    def delete(self, obj: Any) -> None:
        with self.lock:
            self._objects.pop((kind_of(obj), obj._id.val), None)

    def referrers(self, target: Any) -> list[Any]:
        """Stored objects with a reference field pointing at target."""
        key = (kind_of(target), target._id.val)
        out = []
        with self.lock:
            for obj in self._objects.values():
                for f in fields_of(obj):
                    val = getattr(obj, "_" + f, None)
                    if isinstance(val, omero.model.IObject) and val._id is not None:
                        resolved = self.resolve(val)
                        if resolved is not None and (kind_of(resolved), resolved._id.val) == key:
                            out.append(obj)
                            break
        return out

    # -- writing graphs ------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All-or-nothing, like the database transaction around each server call."""
        with self.lock:
            snapshot = (dict(self._objects), dict(self._next_id))
            try:
                yield
            except BaseException:
                self._objects, self._next_id = snapshot
                raise

    def save(self, obj: Any, actor: Actor) -> Any:
        """Save a client graph; return the stored (flat) root."""
        with self.transaction():
            return _GraphSaver(self, actor).save(obj)

    def replace(self, stored: Any) -> None:
        with self.lock:
            self._objects[(kind_of(stored), stored._id.val)] = stored

    # -- reading graphs ------------------------------------------------------------------
    def copy_out(self, obj: Any, fetch: dict[str, Any] | None = None) -> Any:
        """A client copy: scalars loaded, references unloaded unless fetched."""
        fetch = fetch or {}
        out = type(obj)(obj._id.val, True)
        for f in fields_of(obj):
            if is_collection(obj, f):
                if f in fetch:
                    items = [self.copy_out(x, fetch[f]) for x in self.collection(obj, f)]
                    setattr(out, f"_{f}Seq", items)
                    setattr(out, f"_{f}Loaded", True)
                else:
                    setattr(out, f"_{f}Seq", [])
                    setattr(out, f"_{f}Loaded", False)
                continue
            val = getattr(obj, "_" + f, None)
            if isinstance(val, omero.model.IObject):
                target = self.resolve(val)
                if target is None:
                    val = None
                elif f in fetch:
                    val = self.copy_out(target, fetch[f])
                else:
                    val = self.ref(target)
            setattr(out, "_" + f, val)
        out._details = obj._details
        return out

    def copies(self, objs: Iterable[Any]) -> list[Any]:
        return [self.copy_out(o) for o in objs]


class _GraphSaver:
    def __init__(self, store: ModelStore, actor: Actor) -> None:
        self.store = store
        self.actor = actor
        self.seen: dict[int, Any] = {}

    def save(self, obj: Any) -> Any:
        if id(obj) in self.seen:
            return self.seen[id(obj)]
        kind = kind_of(obj)
        if obj._id is not None and not obj._loaded:
            target = self.store.find(kind, obj._id.val)
            if target is None:
                raise omero.ValidationException(message=f"{kind}:{obj._id.val} does not exist")
            self.seen[id(obj)] = target
            return target
        is_new = obj._id is None
        self.actor.check_write(kind, is_new)
        if is_new:
            stored = self.store.insert(type(obj)(None, True), self.actor)
        else:
            old = self.store.get(kind, obj._id.val)
            if old is None:
                raise omero.ValidationException(message=f"{kind}:{obj._id.val} does not exist")
            stored = type(obj)(obj._id.val, True)
            stored._details = old._details
            self.store.replace(stored)
        self.seen[id(obj)] = stored
        pending: list[Any] = []
        for f in fields_of(obj):
            if is_collection(obj, f):
                if getattr(obj, f"_{f}Loaded", False):
                    pending.extend(getattr(obj, f"_{f}Seq") or [])
                setattr(stored, f"_{f}Seq", [])
                setattr(stored, f"_{f}Loaded", False)
                continue
            val = getattr(obj, "_" + f, None)
            if isinstance(val, omero.model.IObject):
                val = ModelStore.ref(self.save(val))
            setattr(stored, "_" + f, val)
        # Collection members point back at their owner, so they are saved after it.
        for item in pending:
            self.save(item)
        return stored
