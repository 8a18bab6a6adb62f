"""Switch an ImSwitch source tree over to tilebridge's writer (or back): the import line of
the four modules that import ImSwitch's OMEWriter.

    python -m tilebridge_imswitch.switch /opt/imswitch          # use tilebridge's OMEWriter
    python -m tilebridge_imswitch.switch --undo /opt/imswitch   # ImSwitch's own again

Only those lines change, each exactly as ImSwitch writes it (openUC2/ImSwitch 2026-08);
running it twice changes nothing; a module whose line reads otherwise is named and left
alone, so a newer ImSwitch is never half switched without saying so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONTROLLERS = Path("imswitch/imcontrol/controller/controllers")
MODES = CONTROLLERS / "experiment_controller"
IO = "from imswitch.imcontrol.model.io import"
OURS = "from tilebridge_imswitch import"
LINES: dict[Path, tuple[str, str]] = {
    CONTROLLERS / "ExperimentController.py": (
        f"{IO} OMEWriter, OMEWriterConfig, OMEFileStorePaths",
        f"{OURS} OMEWriter, OMEWriterConfig, OMEFileStorePaths",
    ),
    MODES / "experiment_normal_mode.py": (
        f"{IO} OMEWriter, OMEROConnectionParams",
        f"{IO} OMEROConnectionParams\n{OURS} OMEWriter",
    ),
    MODES / "experiment_performance_mode.py": (
        f"{IO} OMEWriter, OMEWriterConfig, OMEFileStorePaths",
        f"{OURS} OMEWriter, OMEWriterConfig, OMEFileStorePaths",
    ),
    CONTROLLERS / "LightsheetController.py": (
        f"{IO} OMEWriter, OMEWriterConfig, OMEFileStorePaths, SingleTiffWriter",
        f"{IO} SingleTiffWriter\n{OURS} OMEWriter, OMEWriterConfig, OMEFileStorePaths",
    ),
}


def switch(tree: Path, undo: bool = False) -> list[str]:
    """Rewrite the import lines under `tree`; returns what it did, one line per module."""
    report = []
    for relative, (theirs, ours) in LINES.items():
        path = tree / relative
        old, new = (ours, theirs) if undo else (theirs, ours)
        text = path.read_text() if path.exists() else None
        if text is None:
            report.append(f"missing: {relative}")
        elif f"\n{new}\n" in f"\n{text}":
            report.append(f"already: {relative}")
        elif f"\n{old}\n" in f"\n{text}":
            path.write_text(f"\n{text}".replace(f"\n{old}\n", f"\n{new}\n", 1)[1:])
            report.append(f"switched: {relative}")
        else:
            report.append(f"not as expected, left alone: {relative}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", type=Path, help="the ImSwitch source folder (has imswitch/)")
    parser.add_argument("--undo", action="store_true", help="back to ImSwitch's own writer")
    args = parser.parse_args(argv)
    report = switch(args.tree, args.undo)
    print("\n".join(report))
    return 0 if all(line.startswith(("switched", "already")) for line in report) else 1


if __name__ == "__main__":
    sys.exit(main())
