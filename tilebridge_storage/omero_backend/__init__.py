"""OMERO storage backend: the ingest writes images into OMERO.

Modules, each owning one concern:

  settings    OmeroSettings, per-device DevicePolicy and Credentials (pydantic, no omero-py)
  session     login with timeouts, group choice, keep-alive thread, a pool that re-logs in
  errors      OMERO/Ice exceptions -> TransientError (retry) / PermanentError (give up)
  targets     the project and dataset, found or created as the policy allows
  provenance  marking created images, finding and deleting those of earlier attempts
  images      creating the OMERO image(s) of a mosaic or per_tile manifest
  metadata    annotations, tags, pixel sizes, channel names, plane positions
  pixels      writing pixels band by band as tiles arrive, by OMERO's pyramid/ROMIO rules
  backend     OmeroBackend and its ImageWriter

Importing this package (or `settings`) does not import omero-py; `backend` does.
"""

from tilebridge_storage.omero_backend.settings import Credentials, DevicePolicy, OmeroSettings

__all__ = ["Credentials", "DevicePolicy", "OmeroSettings"]
