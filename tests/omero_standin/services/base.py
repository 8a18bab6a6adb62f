"""What every service servant knows: the server, its Glacier2 session and who is calling."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import omero
import omero.model

from ..model_store import Actor

if TYPE_CHECKING:
    from ..glacier import GlacierSession
    from ..server import OmeroStandin


class Service:
    def __init__(self, server: OmeroStandin, session: GlacierSession) -> None:
        self.server = server
        self.session = session
        # One lock for the whole stand-in: calls are short, and one order of events is
        # what makes the write rules checkable.
        self.lock = server.lock

    def gate(self) -> None:
        """Every call counts as activity; a dead session refuses it (see amd._gated)."""
        try:
            self.session.omero.touch()
        except omero.SessionException:
            self.server.on_session_dead(self.session.omero)
            raise

    @property
    def user(self) -> Any:
        return self.session.omero.user

    def actor(self) -> Actor:
        return Actor(self.user.id, self.user.group_id, self.check_write)

    def check_write(self, kind: str, is_new: bool) -> None:
        if self.user.read_only:
            raise omero.SecurityViolation(
                message=f"{self.user.name} may not write {kind}: the user is read-only"
            )
        if is_new and kind in self.server.faults.forbid_create:
            raise omero.SecurityViolation(
                message=f"{self.user.name} is not permitted to create {kind} objects"
            )

    def event_context(self) -> Any:
        user = self.user
        return omero.sys.EventContext(
            shareId=-1,
            sessionId=0,
            sessionUuid=self.session.omero.uuid,
            userId=user.id,
            userName=user.name,
            groupId=user.group_id,
            groupName=user.group,
            isAdmin=False,
            adminPrivileges=[],
            eventId=-1,
            eventType="User",
            memberOfGroups=[user.group_id],
            leaderOfGroups=[],
            groupPermissions=omero.model.PermissionsI("rwr---"),
        )
