"""ImSwitch's OME writer, backed by tilebridge: a drop-in for
`imswitch.imcontrol.model.io.OMEWriter`, `OMEWriterConfig` and `OMEFileStorePaths`.

Switching ImSwitch over is the import line of the modules that use them (docs/imswitch.md):

    from tilebridge_imswitch import OMEWriter, OMEWriterConfig, OMEFileStorePaths

Every frame goes to the tilebridge edge agent (durable on the Pi before `write_frame`
returns), which streams it to the tilebridge server (OMERO, its archive); the files ImSwitch's
UI reads are written where it looks. The Pi holds no OMERO credentials.

Modules: `writer` (OMEWriter) and `images` (its images' traffic with the edge), `config` (the
config and paths classes), `placement`, `frames`, `manifest` and `layout` (pure: which tile a
frame is, what image a writer makes, where ImSwitch's files go), `port` (what the writer needs
of the edge) with `edge_frontdoor` (the edge's front door: its fast path, or an agent in this
process), `settings` and `root` (the one composition root), `switch` (the import lines of
ImSwitch's modules).
"""

from tilebridge_imswitch.config import OMEFileStorePaths, OMEWriterConfig
from tilebridge_imswitch.root import close, configure
from tilebridge_imswitch.writer import OMEWriter

__all__ = ["OMEFileStorePaths", "OMEWriter", "OMEWriterConfig", "close", "configure"]
