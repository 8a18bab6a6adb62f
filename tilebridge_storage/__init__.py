"""Where tiles end up: one interface (`base`), one module per backend."""

from tilebridge_storage.base import ImageWriter, StorageBackend, StoredImage

__all__ = ["ImageWriter", "StorageBackend", "StoredImage"]
