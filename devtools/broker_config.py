"""The broker's listener and authentication policy for every place it runs, from one file.

`mosquitto/mosquitto.conf` is the source, and production installs it unchanged. The compose
deployment's `deploy/compose/mosquitto.conf` (generated, checked in) and the tests' secured
brokers (`devtools/broker.py`) are renderings of it that change only what differs by site:
the values of path options (where passwd, acl and the certificates are) and the port and
address of each listener (a test may leave a listener out). Every other line
(`allow_anonymous`, `require_certificate`, `use_username_as_clientid`, ...) is copied as it
is, so a policy line cannot be in one place and missing from another.

    python -m devtools.broker_config compose > deploy/compose/mosquitto.conf

`tests/deploy/test_compose_broker.py` fails when the checked-in compose file is not the
rendering of today's source.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "mosquitto" / "mosquitto.conf"
SETTINGS = REPO / "mosquitto" / "tilebridge.conf"
PRODUCTION_DIR = "/etc/mosquitto/tilebridge/"
# The source's listeners: plain TCP for the local services, TLS for the microscopes.
PLAIN, TLS = 1883, 8883

COMPOSE_DIR = "/mosquitto/config/tilebridge/"
COMPOSE_HEADER = (
    "# GENERATED from mosquitto/mosquitto.conf by `python -m devtools.broker_config compose`:",
    "# do not edit; the reasons for every line are the comments there. What differs from",
    "# production: the files are under /mosquitto/config/tilebridge/ (deploy/compose/broker/ on",
    "# the host), the plain listener listens on the compose network instead of loopback (its",
    "# port is not published), the log goes to stdout, the tile-traffic settings come from",
    "# mosquitto/tilebridge.conf mounted into conf.d/.",
    "persistence_location /mosquitto/data/",
    "log_dest stdout",
)
COMPOSE_FOOTER = ("include_dir /mosquitto/config/conf.d",)

# Options whose value names a file or directory: the only values a rendering changes.
PATH_OPTIONS = frozenset(
    {
        "password_file", "acl_file", "psk_file", "cafile", "capath", "certfile", "keyfile",
        "crlfile", "dhparamfile", "persistence_location", "include_dir", "pid_file",
    }
)  # fmt: skip


class ConfigError(ValueError):
    """The source cannot be rendered as asked (an unknown listener or file)."""


@dataclass(frozen=True)
class Listen:
    """Where a rendered listener listens; no address: every interface."""

    port: int
    address: str | None = None

    def line(self) -> str:
        return f"listener {self.port}" + (f" {self.address}" if self.address else "")


def options(text: str) -> list[tuple[str, str]]:
    """(option, value) of every setting line in file order; comments and blanks left out."""
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            option, _, value = stripped.partition(" ")
            found.append((option, value.strip()))
    return found


def sections(text: str) -> dict[int | None, list[tuple[str, str]]]:
    """The global options (key None), then each listener's options by its port."""
    result: dict[int | None, list[tuple[str, str]]] = {None: []}
    current: int | None = None
    for option, value in options(text):
        if option == "listener":
            current = int(value.split()[0])
            result[current] = []
        result[current].append((option, value))
    return result


def under(directory: str) -> Callable[[str], str]:
    """Paths under the production directory moved to `directory`."""
    target = directory.rstrip("/") + "/"

    def move(value: str) -> str:
        if not value.startswith(PRODUCTION_DIR):
            raise ConfigError(f"{value} is not under {PRODUCTION_DIR}: say where it goes")
        return target + value[len(PRODUCTION_DIR) :]

    return move


def by_name(files: Mapping[str, Path | str]) -> Callable[[str], str]:
    """Paths replaced by the file of the same name in `files` (name -> path)."""

    def move(value: str) -> str:
        name = PurePosixPath(value).name
        if name not in files:
            raise ConfigError(f"no file given for {value}")
        return str(files[name])

    return move


def render(
    text: str,
    *,
    paths: Callable[[str], str],
    listeners: Mapping[int, Listen | None],
    header: Sequence[str] = (),
    footer: Sequence[str] = (),
) -> str:
    """`text` with its path values moved and its listeners placed (None: left out)."""
    ports = {port for port in sections(text) if port is not None}
    if set(listeners) != ports:
        raise ConfigError(f"the config has listeners {sorted(ports)}, not {sorted(listeners)}")
    out = list(header)
    keep = True
    for option, value in options(text):
        if option == "listener":
            target = listeners[int(value.split()[0])]
            keep = target is not None
            if target is not None:
                out += ["", target.line()]
            continue
        if keep:
            out.append(f"{option} {paths(value) if option in PATH_OPTIONS else value}")
    if footer:
        out += ["", *footer]
    return "\n".join(out) + "\n"


def with_values(text: str, values: Mapping[str, object]) -> str:
    """`text` (tilebridge.conf) with the named options set to other values, e.g. a small
    queue limit for a test; an option the file does not set is an error, so a test always
    changes the shipped setting rather than adding one that might be overridden."""
    lines = text.splitlines()
    for option, value in values.items():
        hits = [i for i, line in enumerate(lines) if line.split(" ", 1)[0] == option]
        if len(hits) != 1:
            raise ConfigError(f"{option} is set {len(hits)} times, not once")
        lines[hits[0]] = f"{option} {value}"
    return "\n".join(lines) + "\n"


def compose() -> str:
    """deploy/compose/mosquitto.conf: the source as the eclipse-mosquitto container sees it."""
    return render(
        SOURCE.read_text(),
        paths=under(COMPOSE_DIR),
        listeners={PLAIN: Listen(PLAIN), TLS: Listen(TLS)},
        header=COMPOSE_HEADER,
        footer=COMPOSE_FOOTER,
    )


def main(argv: Sequence[str]) -> int:
    if list(argv) != ["compose"]:
        print("usage: python -m devtools.broker_config compose", file=sys.stderr)
        return 2
    sys.stdout.write(compose())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
