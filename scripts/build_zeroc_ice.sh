#!/usr/bin/env bash
# Build (once) and cache a zeroc-ice 3.6.5 wheel for the given Python interpreter.
#
# omero-py 5.23 needs zeroc-ice>=3.6.5,<3.7 and PyPI has only the 3.6.5 sdist, which does
# not compile on Python >= 3.11. We patch the two offending spots and build a wheel that is
# cached outside the repo, so the ~8 minute build happens once per machine.
#
# Usage: scripts/build_zeroc_ice.sh [PYTHON]   (default: python3)
# Prints the path of the cached wheel on its last line of stdout.
# Env:   TILEBRIDGE_WHEEL_CACHE  cache dir (default: $HOME/.cache/tilebridge/wheels)
# Needs: a C++ compiler, libssl-dev, libbz2-dev, the Python headers; PyPI access.
set -euo pipefail

PY="${1:-python3}"
ICE_VERSION="3.6.5"
CACHE_DIR="${TILEBRIDGE_WHEEL_CACHE:-$HOME/.cache/tilebridge/wheels}"

# The wheel name pip produces for this interpreter, e.g. zeroc_ice-3.6.5-cp311-cp311-linux_x86_64.whl
WHEEL_NAME="$("$PY" - "$ICE_VERSION" <<'EOF'
import sys, sysconfig
tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
print(f"zeroc_ice-{sys.argv[1]}-{tag}-{tag}-{plat}.whl")
EOF
)"

mkdir -p "$CACHE_DIR"
if [[ -f "$CACHE_DIR/$WHEEL_NAME" ]]; then
    echo "reusing cached wheel $CACHE_DIR/$WHEEL_NAME" >&2
    echo "$CACHE_DIR/$WHEEL_NAME"
    exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/zeroc-ice-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "building $WHEEL_NAME in $WORK (takes several minutes)" >&2
"$PY" -m pip download --quiet --no-deps --no-binary :all: "zeroc-ice==$ICE_VERSION" -d "$WORK/sdist"
tar -xzf "$WORK/sdist/zeroc-ice-$ICE_VERSION.tar.gz" -C "$WORK"
SRC="$WORK/zeroc-ice-$ICE_VERSION"

"$PY" - "$SRC" <<'EOF'
import pathlib, sys
src = pathlib.Path(sys.argv[1])

def patch(rel, old, new):
    path = src / rel
    text = path.read_text()
    if text.count(old) != 1:
        sys.exit(f"patch target not found exactly once in {rel}: {old!r}")
    path.write_text(text.replace(old, new))

# Python 3.11 removed eval.h; what Slice.cpp used from it is declared by Python.h already.
patch("src/Slice.cpp", "#include <eval.h>\n",
      "// eval.h removed: gone in Python 3.11, its declarations come with Python.h.\n")
# PyThreadState.frame is gone in 3.11. PyEval_GetFrame() returns the same current frame as a
# borrowed reference (exactly like the old field), so no reference handling changes.
patch("src/Util.cpp", "PyFrameObject *f = PyThreadState_GET()->frame;",
      "PyFrameObject *f = PyEval_GetFrame(); // was PyThreadState_GET()->frame (gone in 3.11)")
EOF

# No -j: setup.py compiles its one extension (IcePy) through distutils, which ignores
# MAKEFLAGS and parallelises only across extensions, so the ~7-8 minutes are serial.

# A throw-away build venv with pinned tools keeps the build independent of whatever setuptools
# the target interpreter has (setup.py imports distutils, and the legacy build needs `wheel`).
"$PY" -m venv "$WORK/buildenv"
BPY="$WORK/buildenv/bin/python"
"$BPY" -m pip install --quiet "setuptools==69.5.1" "wheel==0.43.0"
"$BPY" -m pip wheel --no-deps --no-build-isolation -w "$WORK/dist" "$SRC" >&2

BUILT="$(ls "$WORK/dist"/zeroc_ice-"$ICE_VERSION"-*.whl)"
if [[ "$(basename "$BUILT")" != "$WHEEL_NAME" ]]; then
    echo "unexpected wheel name $(basename "$BUILT") (expected $WHEEL_NAME)" >&2
    exit 1
fi
cp "$BUILT" "$CACHE_DIR/$WHEEL_NAME.partial"
mv "$CACHE_DIR/$WHEEL_NAME.partial" "$CACHE_DIR/$WHEEL_NAME"   # atomic: no half wheel is ever reused
echo "cached $CACHE_DIR/$WHEEL_NAME" >&2
echo "$CACHE_DIR/$WHEEL_NAME"
