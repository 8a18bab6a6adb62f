#!/usr/bin/env bash
# Install the tilebridge edge agent on a microscope's Raspberry Pi (64-bit Raspberry Pi OS or
# Debian 12 arm64) as the systemd service tilebridge-edge. See docs/deploy.md.
#
#   sudo deploy/install-edge.sh [SOURCE]
#
# SOURCE is what pip installs tilebridge from: a checkout (default: the repository this script
# is in) or a built wheel. Running it again upgrades the code and keeps the configuration and
# credentials. DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

# PYTHON: the interpreter of the virtual environment [/usr/bin/python3] (the system's, so
# the service user can run it); PREFIX, ETC, UNIT_DIR, SERVICE_USER: where things go.
PYTHON=${PYTHON:-/usr/bin/python3}
PREFIX=${PREFIX:-/opt/tilebridge}
ETC=${ETC:-/etc/tilebridge-edge}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
SERVICE_USER=${SERVICE_USER:-tilebridge}
DRY_RUN=${DRY_RUN:-0}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
source=${1:-$repo}

run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$*"
  else
    "$@"
  fi
}

if [[ $DRY_RUN != 1 && $EUID -ne 0 ]]; then
  echo "install-edge.sh: run as root (sudo)" >&2
  exit 1
fi
if [[ $(uname -m) != aarch64 ]]; then
  echo "install-edge.sh: warning: $(uname -m) is not 64-bit ARM; installing anyway" >&2
fi

run apt-get update
run apt-get install -y --no-install-recommends python3 python3-venv python3-pip
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
  run useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin "$SERVICE_USER"
fi

if [[ $DRY_RUN != 1 && ! -x $PYTHON ]]; then
  echo "install-edge.sh: no interpreter at $PYTHON (set PYTHON=...)" >&2
  exit 1
fi
run "$PYTHON" -m venv "$PREFIX/venv"
run "$PREFIX/venv/bin/pip" install --upgrade pip
# Only the [edge] extra: the Pi never gets omero-py or any other server-side package.
run "$PREFIX/venv/bin/pip" install --upgrade "${source}[edge]"
if [[ $DRY_RUN != 1 ]] && "$PREFIX/venv/bin/python" -c 'import omero' 2>/dev/null; then
  echo "install-edge.sh: omero-py is installed in $PREFIX/venv; it does not belong on a Pi" >&2
  exit 1
fi
if [[ -f $repo/docs/deploy.md ]]; then
  run install -D -m 0644 "$repo/docs/deploy.md" "$PREFIX/docs/deploy.md"
fi

# $ETC is the directory `server-ingest device add` makes for this microscope (config.json,
# mqtt-password, ca.crt, maybe a client key). Root owns it; the service's group may read it,
# nobody else: the files hold the device's broker secret.
run install -d -m 0750 -o root -g "$SERVICE_USER" "$ETC"
if [[ ! -e $ETC/config.json ]]; then
  run install -m 0640 -o root -g "$SERVICE_USER" "$here/edge.example.json" "$ETC/config.json"
fi
for file in "$ETC"/*; do
  if [[ -f $file ]]; then
    run chown root:"$SERVICE_USER" "$file"
    run chmod 0640 "$file"
  fi
done
run install -m 0644 "$here/systemd/tilebridge-edge.service" "$UNIT_DIR/tilebridge-edge.service"
run systemctl daemon-reload

cat <<NEXT

tilebridge edge agent installed in $PREFIX/venv. Next steps (docs/deploy.md has details):

  1. On the server, create this microscope's broker identity:
       sudo server-ingest device add <device-id> --host <broker host name>
     and copy the directory it names to this Pi as $ETC/ (e.g. with scp).
  2. Run this script again: it gives the copied files to root:$SERVICE_USER, mode 0640.
     Add settings from deploy/edge.example.json to $ETC/config.json as needed.
  3. Start the agent and follow its log:
       sudo systemctl enable --now tilebridge-edge
       journalctl -u tilebridge-edge -f
  4. Check that the microscope shows up online on the dashboard.

NEXT
