"""IPixels: creating images (Image + Pixels + Channels) and their pixel buffers."""

from __future__ import annotations

from typing import Any

import omero
import omero.api
import omero.model
from omero.rtypes import rdouble, rint, rlong, rstring

from ..amd import servant
from ..rules import Geometry
from .base import Service

PIX_DESCRIPTION = {
    "image": {},
    "pixelsType": {},
    "dimensionOrder": {},
    "channels": {"logicalChannel": {}, "statsInfo": {}},
}


@servant
class IPixels(omero.api.IPixels, Service):
    def __init__(self, server: Any, session: Any) -> None:
        Service.__init__(self, server, session)
        self.store = server.store

    def _pixels_type(self, pixelsType: Any) -> Any:
        if pixelsType is None:
            raise omero.ApiUsageException(message="pixelsType is required")
        if pixelsType.id is not None:
            found = self.store.get("PixelsType", pixelsType.id.val)
        else:
            found = next(
                (p for p in self.store.all_of("PixelsType") if p.value.val == pixelsType.value.val),
                None,
            )
        if found is None:
            raise omero.ValidationException(message=f"unknown pixels type {pixelsType}")
        return found

    def createImage(
        self, sizeX: int, sizeY: int, sizeZ: int, sizeT: int, channelList: list[int],
        pixelsType: Any, name: str, description: str, current: Any = None,
    ) -> Any:  # fmt: skip
        if not channelList:
            raise omero.ValidationException(message="channelList must not be empty")
        ptype = self._pixels_type(pixelsType)
        geometry = Geometry(sizeX, sizeY, sizeZ, len(channelList), sizeT, ptype.value.val)
        order = next(o for o in self.store.all_of("DimensionOrder") if o.value.val == "XYZCT")

        image = omero.model.ImageI()
        image.setName(rstring(name))
        image.setDescription(rstring(description))
        pixels = omero.model.PixelsI()
        for setter, value in (
            (pixels.setSizeX, sizeX), (pixels.setSizeY, sizeY), (pixels.setSizeZ, sizeZ),
            (pixels.setSizeC, len(channelList)), (pixels.setSizeT, sizeT),
        ):  # fmt: skip
            setter(rint(value))
        pixels.setPixelsType(omero.model.PixelsTypeI(ptype.id.val, False))
        pixels.setDimensionOrder(omero.model.DimensionOrderI(order.id.val, False))
        pixels.setSignificantBits(rint(geometry.bytes_per_pixel * 8))
        pixels.setSha1(rstring("Pending..."))
        image.addPixels(pixels)
        for _ in channelList:
            channel = omero.model.ChannelI()
            channel.setLogicalChannel(omero.model.LogicalChannelI())
            pixels.addChannel(channel)

        stored = self.store.save(image, self.actor())
        stored_pixels = self.store.collection(stored, "pixels")[0]
        self.server.repository.create(stored_pixels.id.val, geometry)
        return rlong(stored.id.val)

    def setChannelGlobalMinMax(
        self, pixelsId: int, channelIndex: int, min: float, max: float, current: Any = None
    ) -> None:
        pixels = self._pixels(pixelsId)
        channels = self.store.collection(pixels, "channels")
        if not 0 <= channelIndex < len(channels):
            raise omero.ApiUsageException(message=f"no channel {channelIndex} in Pixels:{pixelsId}")
        self.check_write("StatsInfo", True)
        stats = omero.model.StatsInfoI()
        stats.setGlobalMin(rdouble(min))
        stats.setGlobalMax(rdouble(max))
        self.store.insert(stats, self.actor())
        channels[channelIndex].setStatsInfo(omero.model.StatsInfoI(stats.id.val, False))

    def retrievePixDescription(self, pixId: int, current: Any = None) -> Any:
        return self.store.copy_out(self._pixels(pixId), PIX_DESCRIPTION)

    def getBitDepth(self, type: Any, current: Any = None) -> int:
        return Geometry(1, 1, 1, 1, 1, self._pixels_type(type).value.val).bytes_per_pixel * 8

    def getEnumeration(self, enumClass: str, value: str, current: Any = None) -> Any:
        for obj in self.store.all_of(enumClass):
            if obj.value.val == value:
                return self.store.copy_out(obj)
        raise omero.ApiUsageException(message=f"no {enumClass} {value!r}")

    def getAllEnumerations(self, enumClass: str, current: Any = None) -> list[Any]:
        return self.store.copies(self.store.all_of(enumClass))

    def _pixels(self, pixels_id: int) -> Any:
        pixels = self.store.get("Pixels", pixels_id)
        if pixels is None:
            raise omero.ValidationException(message=f"Pixels:{pixels_id} does not exist")
        return pixels


@servant
class IContainer(omero.api.IContainer, Service):
    """Registered so getContainerService() works; writers use IQuery/IUpdate instead."""

    def __init__(self, server: Any, session: Any) -> None:
        Service.__init__(self, server, session)
