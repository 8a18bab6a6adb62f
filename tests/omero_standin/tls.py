"""A throw-away self-signed certificate for the stand-in's ssl endpoint.

Real OMERO 5.6 servers serve Glacier2 over ssl with a self-signed certificate (made by
omero-certificates) and omero-py connects with IceSSL.VerifyPeer=0, so any certificate works.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def make_self_signed(directory: Path) -> Path:
    """Write server.pem (key, then certificate) into directory, using the openssl tool.

    One PEM holding both is what IceSSL 3.6 reads from IceSSL.CertFile; its separate
    IceSSL.KeyFile is deprecated.
    """
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
    both = directory / "server.pem"
    both.write_text(key.read_text() + cert.read_text())
    cert.unlink()
    key.unlink()
    return both
