#!/usr/bin/env bash
# Install the tilebridge server side on Debian 12: Mosquitto with the repository's broker
# configuration, the ingest and the dashboard as systemd services. See docs/deploy.md.
#
#   sudo [WITH_OMERO=1] deploy/install-server.sh [SOURCE]
#
# SOURCE is what pip installs tilebridge from: a checkout (default: the repository this script
# is in) or a built wheel. Running it again upgrades the code and keeps the configuration,
# credentials, broker users and ACL. DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

PREFIX=${PREFIX:-/opt/tilebridge}
ETC=${ETC:-/etc/tilebridge}
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

run python3 -m venv "$PREFIX/venv"
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

# The broker: tile-traffic settings and listeners from the repository, users and ACL here.
run install -m 0644 "$repo/mosquitto/tilebridge.conf" "$MOSQUITTO_ETC/conf.d/tilebridge.conf"
run install -m 0644 "$repo/mosquitto/mosquitto.conf" \
  "$MOSQUITTO_ETC/conf.d/tilebridge-listeners.conf"
run install -d -m 0750 -o root -g mosquitto "$broker_dir"
if [[ ! -e $broker_dir/acl ]]; then
  run install -m 0640 -o root -g mosquitto "$repo/mosquitto/acl" "$broker_dir/acl"
fi
if [[ ! -e $broker_dir/passwd ]]; then
  run install -m 0640 -o root -g mosquitto /dev/null "$broker_dir/passwd"
fi

run install -d -m 0755 "$ETC"
run install -d -m 0700 "$ETC/credentials"
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
if ((${#missing[@]} == 0)); then
  run systemctl restart mosquitto
else
  echo "install-server.sh: not restarting Mosquitto: its TLS listener needs ${missing[*]}" >&2
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
