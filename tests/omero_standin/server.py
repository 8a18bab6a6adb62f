"""OmeroStandin: the in-process server, its data, and the fault hooks tests pull."""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import Glacier2
import Ice
import numpy as np
import omero
import omero.model
import omero.ObjectFactoryRegistrar
import omero.rtypes
from omero.rtypes import rstring

from .glacier import (
    ROUTER_IDENTITY,
    GlacierRegistry,
    GlacierSession,
    Router,
    SessionGate,
    attach_close_callback,
)
from .model_store import ModelStore, kind_of
from .pixel_buffers import PixelRepository
from .rules import DEFAULT_PYRAMID_THRESHOLD_PX, DEFAULT_PYRAMID_TILE, WriteRules
from .sessions import OmeroSession, SessionRegistry, User
from .tls import make_self_signed

DEFAULT_USER = User("tilebridge", "tilebridge-secret", "tilebridge")
IMAGE_GRAPH = {
    "pixels": {"channels": {"logicalChannel": {}, "statsInfo": {}}, "pixelsType": {}},
    "datasetLinks": {},
    "annotationLinks": {"child": {}},
}


@dataclass
class Faults:
    # classes whose *creation* fails with SecurityViolation (e.g. {"Project", "Dataset"})
    forbid_create: set[str] = field(default_factory=set)
    # after this many accepted setTile calls the server dies (one shot)
    stop_after_set_tiles: int | None = None
    # the next this many Pixels written get one byte flipped in their first setTile, as a
    # disk or a bug could: what read-back verification must catch (-1: every one)
    flip_byte: int = 0


class Link(NamedTuple):
    kind: str
    parent_kind: str
    parent_id: int
    child_kind: str
    child_id: int


class OmeroStandin:
    """An OMERO.server look-alike on 127.0.0.1 that the unmodified omero-py client talks to.

    ``port`` is the ssl Glacier2 port (the client's default transport); ``tcp_port`` is the
    insecure one that BlitzGateway switches to after login via ``omero.router.insecure``.
    """

    def __init__(
        self,
        users: Iterable[User] | None = None,
        *,
        idle_timeout_s: float = 600.0,
        pyramid_threshold_px: int = DEFAULT_PYRAMID_THRESHOLD_PX,
        pyramid_tile: tuple[int, int] = DEFAULT_PYRAMID_TILE,
        host: str = "127.0.0.1",
        message_size_max_kb: int = 65536,
    ) -> None:
        self.lock = threading.RLock()
        self.host = host
        self.port = 0
        self.tcp_port = 0
        self.rules = WriteRules(pyramid_threshold_px, pyramid_tile)
        self.store = ModelStore()
        self.repository = PixelRepository(self.rules)
        self.sessions = SessionRegistry(idle_timeout_s)
        self.glaciers = GlacierRegistry()
        self.users: dict[str, User] = {}
        self.faults = Faults()
        self.set_tile_calls = 0
        self.crashed = False
        self.database_uuid = str(uuid.uuid4())
        self._adapter: Any = None
        self._crash_thread: threading.Thread | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="omero-standin-"))
        pem = make_self_signed(self._tmp)
        self._ic = Ice.initialize(self._init_data(pem, message_size_max_kb))
        omero.ObjectFactoryRegistrar.registerObjectFactory(self._ic, None)
        for factory in omero.rtypes.ObjectFactories.values():
            factory.register(self._ic)
        for user in users if users is not None else [DEFAULT_USER]:
            self.add_user(User(user.name, user.password, user.group, read_only=user.read_only))

    @staticmethod
    def _init_data(pem: Path, message_size_max_kb: int) -> Any:
        props = Ice.createProperties()
        for name, value in {
            # Ice itself refuses a request above this size, as on a real server.
            "Ice.MessageSizeMax": str(message_size_max_kb),
            "Ice.Plugin.IceSSL": "IceSSL:createIceSSL",
            "IceSSL.CertFile": str(pem),
            "IceSSL.VerifyPeer": "0",
            "Ice.ThreadPool.Server.Size": "2",
            "Ice.ThreadPool.Server.SizeMax": "8",
            "Ice.Warn.Connections": "0",
        }.items():
            props.setProperty(name, value)
        init = Ice.InitializationData()
        init.properties = props
        return init

    # -- running -------------------------------------------------------------------------
    def start(self) -> None:
        """Listen (again) on the same ports, with the data kept while stopped."""
        if self._crash_thread is not None:
            self._crash_thread.join()
            self._crash_thread = None
        with self.lock:
            if self._adapter is not None:
                return
            endpoints = f"ssl -h {self.host} -p {self.port}:tcp -h {self.host} -p {self.tcp_port}"
            adapter = self._ic.createObjectAdapterWithEndpoints("OMERO.Glacier2", endpoints)
            adapter.add(Router(self), ROUTER_IDENTITY)
            adapter.addServantLocator(SessionGate(self), "")
            adapter.activate()
            for endpoint in adapter.getEndpoints():
                info = endpoint.getInfo()
                if info.secure():
                    self.port = info.port
                else:
                    self.tcp_port = info.port
            self._adapter = adapter
            self.crashed = False

    def stop(self) -> None:
        """Go down like a stopped server: connections drop, new ones are refused.

        Logins and open stores are lost (a pyramid pass in progress becomes BROKEN); OMERO
        sessions, objects and pixel data survive for start().
        """
        with self.lock:
            adapter, self._adapter = self._adapter, None
            for glacier in self.glaciers.all():
                self._drop_glacier(glacier)
            self.repository.interrupt_all()
        if adapter is not None:
            adapter.destroy()

    @property
    def running(self) -> bool:
        return self._adapter is not None

    def close(self) -> None:
        self.stop()
        if self._crash_thread is not None:
            self._crash_thread.join()
        self._ic.destroy()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def crash(self) -> None:
        """Die now: the call in progress may still answer, nothing after it does."""
        with self.lock:
            self.crashed = True
            self.repository.interrupt_all()
            # stop() waits for running calls, so it cannot run on the dispatching thread.
            self._crash_thread = threading.Thread(target=self.stop, name="standin-crash")
            self._crash_thread.start()

    def count_set_tile(self) -> None:
        self.set_tile_calls += 1
        limit = self.faults.stop_after_set_tiles
        if limit is not None and self.set_tile_calls >= limit:
            self.faults.stop_after_set_tiles = None
            self.crash()

    # -- users and sessions --------------------------------------------------------------
    def add_user(self, user: User) -> User:
        with self.lock:
            group = next(
                (g for g in self.store.all_of("ExperimenterGroup") if g.name.val == user.group),
                None,
            )
            if group is None:
                group = omero.model.ExperimenterGroupI()
                group.setName(rstring(user.group))
                group.details.permissions = omero.model.PermissionsI("rwr---")
                self.store.insert(group)
            exp = omero.model.ExperimenterI()
            exp.setOmeName(rstring(user.name))
            exp.setFirstName(rstring(user.name))
            exp.setLastName(rstring("stand-in"))
            self.store.insert(exp)
            user.id, user.group_id = exp.id.val, group.id.val
            self.users[user.name] = user
            return user

    def set_read_only(self, username: str, read_only: bool = True) -> None:
        self.users[username].read_only = read_only

    def login(self, name: str, password: str, current: Any) -> Any:
        with self.lock:
            if self.glaciers.for_connection(current.con) is not None:
                raise Glacier2.CannotCreateSessionException(reason="Session already exists")
            # omero.client joins an existing session by sending its uuid as name and password.
            session = self.sessions.join(name) if name == password else None
            if session is None:
                user = self.users.get(name)
                if user is None or user.password != password:
                    raise Glacier2.PermissionDeniedException(
                        reason=f"Password check failed for '{name}'"
                    )
                session = self.sessions.create(user)
            glacier = GlacierSession(self.glaciers.new_category(), session, current.con)
            # omero.client reads the session uuid from the ServiceFactory's identity name.
            glacier.servants[session.uuid] = self.make_service("ServiceFactory", glacier)
            self.glaciers.add(glacier)
        attach_close_callback(self, glacier)
        prx = current.adapter.createProxy(Ice.Identity(session.uuid, glacier.category))
        return Glacier2.SessionPrx.uncheckedCast(prx)

    def make_service(self, name: str, glacier: GlacierSession) -> Any:
        from .services.admin import IAdmin, IConfig, ISession
        from .services.factory import ServiceFactory
        from .services.pixels import IContainer, IPixels
        from .services.query import IQuery
        from .services.update import IUpdate

        classes: dict[str, Any] = {
            "ServiceFactory": ServiceFactory,
            "IAdmin": IAdmin,
            "IConfig": IConfig,
            "ISession": ISession,
            "IQuery": IQuery,
            "IUpdate": IUpdate,
            "IPixels": IPixels,
            "IContainer": IContainer,
        }
        return classes[name](self, glacier)

    def _drop_glacier(self, glacier: GlacierSession) -> None:
        self.glaciers.remove(glacier)
        for servant in list(glacier.servants.values()):
            end = getattr(servant, "end", None)
            if end is not None:
                end()
        glacier.servants.clear()

    def destroy_glacier_session(self, glacier: GlacierSession) -> None:
        with self.lock:
            self._drop_glacier(glacier)
            closing = glacier.close_on_destroy and not glacier.omero.closed
            if closing and self.sessions.close(glacier.omero) == 0:
                self.on_session_dead(glacier.omero)

    def on_session_dead(self, session: OmeroSession) -> None:
        """A session timed out or closed: its stores end; later calls get RemovedSession."""
        with self.lock:
            for glacier in self.glaciers.all():
                if glacier.omero is session:
                    for servant in glacier.servants.values():
                        end = getattr(servant, "end", None)
                        if end is not None:
                            end()

    def config_values(self) -> dict[str, str]:
        side = str(math.isqrt(self.rules.pyramid_threshold_px))
        insecure = f"OMERO.Glacier2/router:tcp -p {self.tcp_port} -h @omero.host@"
        return {
            "omero.router.insecure": insecure,
            "omero.pixeldata.max_plane_width": side,
            "omero.pixeldata.max_plane_height": side,
            "omero.pixeldata.tile_width": str(self.rules.pyramid_tile[0]),
            "omero.pixeldata.tile_height": str(self.rules.pyramid_tile[1]),
            "omero.sessions.timeout": str(int(self.sessions.idle_timeout_s * 1000)),
            "omero.db.uuid": self.database_uuid,
        }

    # -- stored data, for assertions -----------------------------------------------------
    def objects(self, kind: str) -> list[Any]:
        """Copies of every stored object of a class (or superclass, e.g. 'Annotation')."""
        with self.lock:
            objs = sorted(self.store.all_of(kind), key=lambda o: o.id.val)
            return [self.store.copy_out(o) for o in objs]

    def projects(self) -> list[Any]:
        return self.objects("Project")

    def datasets(self) -> list[Any]:
        return self.objects("Dataset")

    def images(self) -> list[Any]:
        """Images with pixels, channels, dataset links and annotations loaded."""
        with self.lock:
            objs = sorted(self.store.all_of("Image"), key=lambda o: o.id.val)
            return [self.store.copy_out(o, IMAGE_GRAPH) for o in objs]

    def image(self, image_id: int) -> Any:
        with self.lock:
            obj = self.store.get("Image", image_id)
            if obj is None:
                raise KeyError(f"no Image:{image_id}")
            return self.store.copy_out(obj, IMAGE_GRAPH)

    def _pixels_id(self, image_id: int) -> int:
        with self.lock:
            obj = self.store.get("Image", image_id)
            if obj is None:
                raise KeyError(f"no Image:{image_id}")
            return int(self.store.collection(obj, "pixels")[0].id.val)

    def pixels(self, image_id: int) -> np.ndarray:
        """A copy of an image's pixels as (T, C, Z, Y, X), native byte order."""
        with self.lock:
            buf = self.repository.get(self._pixels_id(image_id))
            if buf is None:
                raise KeyError(f"no pixel data for Image:{image_id}")
            return buf.data.copy()

    def pixel_state(self, image_id: int) -> str:
        """'empty' | 'writing' | 'complete' | 'broken' (pyramids); 'romio' for small images."""
        with self.lock:
            buf = self.repository.get(self._pixels_id(image_id))
            if buf is None:
                raise KeyError(f"no pixel data for Image:{image_id}")
            return buf.state.value if buf.pyramid else "romio"

    def links(self, kind: str | None = None) -> list[Link]:
        """All links (ProjectDatasetLink, DatasetImageLink, ImageAnnotationLink, ...)."""
        out = []
        with self.lock:
            for link in self.store.all_of("IObject"):
                name = kind_of(link)
                if not name.endswith("Link") or (kind is not None and name != kind):
                    continue
                parent, child = link._parent, link._child
                out.append(Link(name, kind_of(parent), parent.id.val, kind_of(child), child.id.val))
        return sorted(out)

    def annotations(self, image_id: int | None = None) -> list[Any]:
        """All annotations, or those linked to one image."""
        if image_id is None:
            return self.objects("Annotation")
        with self.lock:
            ids = {
                link.child_id
                for link in self.links("ImageAnnotationLink")
                if link.parent_id == image_id
            }
            return [a for a in self.objects("Annotation") if a.id.val in ids]

    def key_values(self, image_id: int, namespace: str | None = None) -> list[tuple[str, str]]:
        """Key-value pairs of the MapAnnotations on an image (optionally one namespace)."""
        pairs: list[tuple[str, str]] = []
        for ann in self.annotations(image_id):
            if not isinstance(ann, omero.model.MapAnnotation):
                continue
            if namespace is not None and (ann.ns is None or ann.ns.val != namespace):
                continue
            pairs.extend((nv.name, nv.value) for nv in ann.getMapValue() or [])
        return pairs
