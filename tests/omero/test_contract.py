"""The storage contract, against OMERO through the unmodified omero-py client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("omero")

from tests.omero.helpers import (
    digest,
    expected_pixels,
    images_of,
    key_values,
    read_pixels,
    settings_for,
)
from tilebridge_protocol.messages import OpenManifest
from tilebridge_storage.base import StorageBackend, StoredImage
from tilebridge_storage.omero_backend.backend import OmeroBackend
from tilebridge_storage.omero_backend.metadata import METADATA_NS
from tilebridge_storage.testing.contract import StorageContract, Tiles


class TestOmeroContract(StorageContract):
    target: Any = None

    @pytest.fixture
    def backend(self, omero_target: Any, tmp_path: Path) -> Iterator[StorageBackend]:
        self.target = omero_target
        backend = self.make_backend(tmp_path)
        yield backend
        backend.close()

    def make_backend(self, tmp_path: Path) -> StorageBackend:
        return OmeroBackend(settings_for(self.target))

    def key_values(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest
    ) -> dict[str, str]:
        return key_values(self.target.connect(), stored.ids["image"], METADATA_NS)

    def leftovers(self, backend: StorageBackend, manifest: OpenManifest) -> list[Any]:
        return images_of(self.target.connect(), manifest)

    def read_back(
        self, backend: StorageBackend, stored: StoredImage, manifest: OpenManifest, tiles: Tiles
    ) -> None:
        image_id, dataset_id = stored.ids["image"], stored.ids["dataset"]
        assert stored.location == f"omero:Image:{image_id} dataset:{dataset_id}"
        conn = self.target.connect()
        query = conn.c.sf.getQueryService()
        import omero

        links = query.findAllByQuery(
            "select l from DatasetImageLink l where l.child.id = :id",
            omero.sys.ParametersI().addId(image_id),
        )
        assert [link.getParent().getId().getValue() for link in links] == [dataset_id]
        image = query.get("Image", image_id)
        assert image.getName().getValue() == manifest.image_name
        got = read_pixels(conn, image_id)
        assert got.dtype == manifest.dtype.numpy.newbyteorder("=")
        assert digest(got) == digest(expected_pixels(manifest, tiles))
        server = self.target.server
        if server is not None:
            # the stand-in's own copy of the pixels, not via the client
            assert digest(server.pixels(image_id)) == digest(expected_pixels(manifest, tiles))
