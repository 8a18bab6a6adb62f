"""The storage contract as tests a backend can run, ours or a third party's.

    from tilebridge_storage.testing import StorageContract

    class TestMyBackend(StorageContract):
        def make_backend(self, tmp_path): ...
        def read_back(self, backend, stored, manifest, tiles): ...

Needs pytest (the `dev` extra); importing `tilebridge_storage` itself never imports this.
"""

from tilebridge_storage.testing.contract import StorageContract, Tiles, ome_key_values
from tilebridge_storage.testing.manifests import make_manifest, make_tiles

__all__ = ["StorageContract", "Tiles", "make_manifest", "make_tiles", "ome_key_values"]
