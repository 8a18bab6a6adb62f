#!/usr/bin/env bash
# Install the tilebridge server side on Debian 12: Mosquitto with the repository's broker
# configuration, the ingest and the dashboard as systemd services. See docs/deploy.md.
#
#   sudo [WITH_OMERO=1] deploy/install-server.sh [SOURCE]
#
# SOURCE is what pip installs tilebridge from: a checkout (default: the repository this script
# is in) or a built wheel. Running it again upgrades the code and keeps the configuration,
# credentials, broker users and ACL, and an edited listener file; Mosquitto is restarted only
# when its configuration changed. DRY_RUN=1 prints the commands instead of running them.
#
# Where things go (environment variables, defaults in brackets):
#   PYTHON         the interpreter the virtual environment is made from [/usr/bin/python3]:
#                  the system's, so the service user can run it (not a pyenv under /root)
#   PREFIX         the code: $PREFIX/venv, $PREFIX/scripts, $PREFIX/docs [/opt/tilebridge]
#   ETC            configuration and credentials [/etc/tilebridge]
#   ARCHIVE_DIR    a folder for the archive on a data volume, made with the service user as
#                  owner; the unit may write there (ReadWritePaths) [/srv/tilebridge]
#   MOSQUITTO_ETC  the broker's configuration [/etc/mosquitto]
#   UNIT_DIR       systemd units [/etc/systemd/system]
#   SERVICE_USER   the user the ingest runs as [tilebridge]
#   WITH_OMERO=1   also install omero-py (builds zeroc-ice once, docs/omero.md)
set -euo pipefail

PYTHON=${PYTHON:-/usr/bin/python3}
PREFIX=${PREFIX:-/opt/tilebridge}
ETC=${ETC:-/etc/tilebridge}
ARCHIVE_DIR=${ARCHIVE_DIR:-/srv/tilebridge}
MOSQUITTO_ETC=${MOSQUITTO_ETC:-/etc/mosquitto}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
SERVICE_USER=${SERVICE_USER:-tilebridge}
DRY_RUN=${DRY_RUN:-0}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
source=${1:-$repo}
broker_dir=$MOSQUITTO_ETC/tilebridge

run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$*"
  else
    "$@"
  fi
}

identities_added=0

# A broker identity for a local service, made by `server-ingest device add` (which hashes the
# password into Mosquitto's file and extends the ACL) and kept in a root-only credential file
# that systemd hands to the unit. The password never appears on a command line.
add_service_identity() {
  local name=$1 role=$2 credential=$3 out
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ server-ingest device add %s --role %s (password to %s)\n' "$name" "$role" "$credential"
    return
  fi
  if [[ -s $credential ]]; then
    return
  fi
  out=$(mktemp -d)
  "$PREFIX/venv/bin/server-ingest" device add "$name" --role "$role" --out "$out" \
    --password-file "$broker_dir/passwd" --acl "$broker_dir/acl" --hide-password >/dev/null
  install -m 0600 "$out/mqtt-password" "$credential"
  rm -rf "$out"
  identities_added=1
}

if [[ $DRY_RUN != 1 && $EUID -ne 0 ]]; then
  echo "install-server.sh: run as root (sudo)" >&2
  exit 1
fi

run apt-get update
run apt-get install -y --no-install-recommends mosquitto mosquitto-clients \
  python3 python3-venv python3-pip
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
  run useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin "$SERVICE_USER"
fi

if [[ $DRY_RUN != 1 && ! -x $PYTHON ]]; then
  echo "install-server.sh: no interpreter at $PYTHON (set PYTHON=...)" >&2
  exit 1
fi
run "$PYTHON" -m venv "$PREFIX/venv"
run "$PREFIX/venv/bin/pip" install --upgrade pip
# fastapi and uvicorn serve the dashboard (server-ingest dashboard).
run "$PREFIX/venv/bin/pip" install --upgrade "${source}[ingest]" fastapi uvicorn
if [[ ${WITH_OMERO:-0} == 1 ]]; then
  # omero-py needs zeroc-ice 3.6.5, built once from source (docs/omero.md).
  run apt-get install -y --no-install-recommends g++ libssl-dev libbz2-dev
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ pip install <zeroc-ice wheel from scripts/build_zeroc_ice.sh> %s\n' "${source}[ingest,omero]"
  else
    wheel=$(bash "$repo/scripts/build_zeroc_ice.sh" "$PREFIX/venv/bin/python" | tail -n 1)
    "$PREFIX/venv/bin/pip" install "$wheel" "${source}[ingest,omero]"
  fi
fi
# `server-ingest device add` issues device certificates with this script.
run install -D -m 0755 "$repo/scripts/make_certs.sh" "$PREFIX/scripts/make_certs.sh"
if [[ -f $repo/docs/deploy.md ]]; then
  run install -D -m 0644 "$repo/docs/deploy.md" "$PREFIX/docs/deploy.md"
fi

# The broker: tile-traffic settings from the repository, listeners once (then the admin's),
# users and ACL here (install-broker-config.sh says what it changed).
broker_changes=$(MOSQUITTO_ETC=$MOSQUITTO_ETC DRY_RUN=$DRY_RUN bash "$here/install-broker-config.sh")
printf '%s\n' "$broker_changes" | grep -v '^changed: ' | grep . || true

run install -d -m 0755 "$ETC"
run install -d -m 0700 "$ETC/credentials"
# The archive's data volume (archive_dir in ingest.json), owned by the service.
run install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$ARCHIVE_DIR"
add_service_identity ingest ingest "$ETC/credentials/ingest-mqtt-password"
add_service_identity monitor monitor "$ETC/credentials/dashboard-mqtt-password"
if [[ ! -e $ETC/ingest.json ]]; then
  run install -m 0640 -o root -g "$SERVICE_USER" "$here/ingest.example.json" "$ETC/ingest.json"
fi
if [[ ! -e $ETC/dashboard.json ]]; then
  # Readable by all: the dashboard runs as a throwaway user, and the file holds no secret.
  run install -m 0644 "$here/dashboard.example.json" "$ETC/dashboard.json"
fi

for unit in tilebridge-ingest.service tilebridge-dashboard.service; do
  run install -m 0644 "$here/systemd/$unit" "$UNIT_DIR/$unit"
done
run systemctl daemon-reload

missing=()
for file in ca.crt server.crt server.key; do
  [[ -e $broker_dir/$file ]] || missing+=("$broker_dir/$file")
done
if ((${#missing[@]} != 0)); then
  echo "install-server.sh: not restarting Mosquitto: its TLS listener needs ${missing[*]}" >&2
elif [[ $DRY_RUN == 1 ]] || grep -q '^changed: ' <<<"$broker_changes"; then
  run systemctl restart mosquitto
elif ((identities_added)); then
  run systemctl reload mosquitto # new passwords and ACL lines: SIGHUP is enough
else
  echo "install-server.sh: the broker's configuration is unchanged; Mosquitto keeps running"
fi

cat <<NEXT

tilebridge server side installed in $PREFIX/venv. Next steps (docs/deploy.md has details):

  1. Put the broker's TLS files in $broker_dir (ca.crt, server.crt, server.key; the key
     readable by group mosquitto only; scripts/make_certs.sh makes them), then:
       sudo systemctl restart mosquitto
  2. Review $ETC/ingest.json (storage backends, archive_dir) and $ETC/dashboard.json
     (omero_web_url).
  3. Start the ingest and the dashboard:
       sudo systemctl enable --now tilebridge-ingest tilebridge-dashboard
  4. Add each microscope:  sudo $PREFIX/venv/bin/server-ingest device add <device-id> --host <name>
     and run deploy/install-edge.sh on its Raspberry Pi.

NEXT
