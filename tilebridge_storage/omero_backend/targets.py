"""The project and dataset an image goes into: found by name, created only if the policy says so.

Only containers owned by the writing account are used: in a read-only or read-annotate group
another user's project is visible but cannot be linked to, so picking it would fail late
with a permission error instead of early with a clear one. Several containers of the same
name (made by hand) resolve to the oldest, so every writer agrees on one.

A manifest may name an existing container by id instead (`omero_dataset_id`, or
`omero_project_id` with the dataset by name in it): it must exist and be the account's, and
the device's policy is checked against its real name, never against the names the manifest
gives beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tilebridge_protocol.errors import PermanentError
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage.omero_backend._omero import omero
from tilebridge_storage.omero_backend.session import OmeroSession
from tilebridge_storage.omero_backend.settings import DevicePolicy

log = logging.getLogger(__name__)

_PROJECT = "select p from Project p where p.name = :name and p.details.owner.id = :uid"
_DATASET = (
    "select d from Dataset d join d.projectLinks l "
    "where l.parent.id = :pid and d.name = :name and d.details.owner.id = :uid"
)
_PROJECT_OF = "select l from ProjectDatasetLink l where l.child.id = :id"


@dataclass(frozen=True)
class Target:
    project_id: int
    dataset_id: int


def ensure_target(
    session: OmeroSession, policy: DevicePolicy, device: str, manifest: OpenManifest
) -> Target:
    """Find (or, as allowed, create) the manifest's project and dataset."""
    if manifest.omero_dataset_id is not None:
        return _dataset_by_id(session, policy, device, manifest.omero_dataset_id)
    project_id: int | None
    if manifest.omero_project_id is not None:
        project_id = manifest.omero_project_id
        project = _owned(session, "Project", project_id)
        policy.check_target(device, project.getName().getValue(), manifest.dataset)
    else:
        policy.check_target(device, manifest.project, manifest.dataset)
        project_id = _find(session, _PROJECT, name=manifest.project)
    if project_id is None:
        if not policy.may_create_project:
            raise PermanentError(
                f"OMERO project {manifest.project!r} does not exist and the policy of device "
                f"{device} does not allow creating projects"
            )
        project_id = _create_project(session, manifest.project, device)
    dataset_id = _find(session, _DATASET, name=manifest.dataset, pid=project_id)
    if dataset_id is None:
        if not policy.may_create:
            raise PermanentError(
                f"OMERO dataset {manifest.dataset!r} does not exist in project "
                f"{manifest.project!r} and the policy of device {device} does not allow "
                "creating datasets"
            )
        dataset_id = _create_dataset(session, manifest.dataset, project_id, device, manifest)
    return Target(project_id, dataset_id)


def _dataset_by_id(
    session: OmeroSession, policy: DevicePolicy, device: str, dataset_id: int
) -> Target:
    dataset = _owned(session, "Dataset", dataset_id)
    params = omero.sys.ParametersI()
    params.addId(dataset_id)
    links = session.query.findAllByQuery(_PROJECT_OF, params)
    if not links:
        raise PermanentError(f"OMERO Dataset:{dataset_id} is in no project")
    project_id = min(link.getParent().getId().getValue() for link in links)
    project = _owned(session, "Project", project_id)
    policy.check_target(device, project.getName().getValue(), dataset.getName().getValue())
    return Target(project_id, dataset_id)


def _owned(session: OmeroSession, kind: str, object_id: int) -> Any:
    """The container `kind:object_id`, if it exists and the writing account owns it."""
    found = session.query.find(kind, object_id)
    if found is None or found.getDetails().getOwner().getId().getValue() != session.user_id:
        raise PermanentError(
            f"OMERO {kind}:{object_id} does not exist or is not {session.username}'s "
            "(images go only into the writing account's own containers)"
        )
    return found


def _find(session: OmeroSession, query: str, **values: Any) -> int | None:
    params = omero.sys.ParametersI()
    params.add("uid", omero.rtypes.rlong(session.user_id))
    for key, value in values.items():
        params.add(key, omero.rtypes.wrap(value))
    found = session.query.findAllByQuery(query, params)
    ids = sorted(obj.getId().getValue() for obj in found)
    return ids[0] if ids else None


def _create_project(session: OmeroSession, name: str, device: str) -> int:
    project = omero.model.ProjectI()
    project.setName(omero.rtypes.rstring(name))
    project.setDescription(omero.rtypes.rstring(f"Created by tilebridge for device {device}"))
    project_id: int = session.update.saveAndReturnObject(project).getId().getValue()
    log.info("created OMERO project %r (Project:%d)", name, project_id)
    return project_id


def _create_dataset(
    session: OmeroSession, name: str, project_id: int, device: str, manifest: OpenManifest
) -> int:
    dataset = omero.model.DatasetI()
    dataset.setName(omero.rtypes.rstring(name))
    dataset.setDescription(
        omero.rtypes.rstring(
            f"Created by tilebridge for device {device}, experiment {manifest.experiment}"
        )
    )
    # Dataset and its project link in one save: no unlinked dataset if this call fails.
    dataset.linkProject(omero.model.ProjectI(project_id, False))
    dataset_id: int = session.update.saveAndReturnObject(dataset).getId().getValue()
    log.info("created OMERO dataset %r (Dataset:%d)", name, dataset_id)
    return dataset_id
