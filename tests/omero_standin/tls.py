"""A throw-away self-signed certificate for the stand-in's ssl endpoint.

Real OMERO 5.6 servers serve Glacier2 over ssl with a self-signed certificate (made by
omero-certificates) and omero-py connects with IceSSL.VerifyPeer=0, so any certificate works.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """Write cert.pem and key.pem into directory (uses the openssl command line tool)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the OMERO stand-in needs the `openssl` command (Debian: openssl)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
