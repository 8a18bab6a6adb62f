#!/usr/bin/env bash
# The broker's configuration from the repository, installed so that running it again is
# harmless (install-server.sh calls it; docs/deploy.md, section 1.1):
#
#   MOSQUITTO_ETC=/etc/mosquitto BROKER_GROUP=mosquitto deploy/install-broker-config.sh
#
# * conf.d/tilebridge.conf (tile-traffic settings) is the repository's: replaced when it
#   differs (upgrades bring new limits);
# * conf.d/tilebridge-listeners.conf (listeners, TLS files, addresses) is the admin's once
#   installed: kept as it is; when the repository's version differs it is put beside it as
#   tilebridge-listeners.conf.dist (Mosquitto reads only *.conf) for the admin to compare;
# * tilebridge/acl and tilebridge/passwd are created when missing, never replaced.
#
# Prints `changed: <file>` for every file it wrote, so the caller restarts Mosquitto only
# when something changed. DRY_RUN=1 prints every step instead (the full plan).
set -euo pipefail

MOSQUITTO_ETC=${MOSQUITTO_ETC:-/etc/mosquitto}
BROKER_GROUP=${BROKER_GROUP:-mosquitto}
DRY_RUN=${DRY_RUN:-0}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
broker_dir=$MOSQUITTO_ETC/tilebridge

step() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$*"
  else
    "$@"
  fi
}

# $1 source, $2 target, $3 mode, $4 "replace" or "keep"
place() {
  local source=$1 target=$2 mode=$3 policy=$4
  if [[ $DRY_RUN == 1 ]]; then
    step install -m "$mode" "$source" "$target"
    return
  fi
  if [[ ! -e $target ]]; then
    install -m "$mode" "$source" "$target"
    echo "changed: $target"
  elif ! cmp -s "$source" "$target"; then
    if [[ $policy == replace ]]; then
      install -m "$mode" "$source" "$target"
      echo "changed: $target"
    else
      install -m 0644 "$source" "$target.dist"
      echo "kept: $target (edited here; the repository's version is $target.dist)"
    fi
  fi
}

step install -d -m 0755 "$MOSQUITTO_ETC/conf.d"
place "$repo/mosquitto/tilebridge.conf" "$MOSQUITTO_ETC/conf.d/tilebridge.conf" 0644 replace
place "$repo/mosquitto/mosquitto.conf" "$MOSQUITTO_ETC/conf.d/tilebridge-listeners.conf" 0644 keep

step install -d -m 0750 -o root -g "$BROKER_GROUP" "$broker_dir"
if [[ ! -e $broker_dir/acl ]]; then
  step install -m 0640 -o root -g "$BROKER_GROUP" "$repo/mosquitto/acl" "$broker_dir/acl"
  [[ $DRY_RUN == 1 ]] || echo "changed: $broker_dir/acl"
fi
if [[ ! -e $broker_dir/passwd ]]; then
  step install -m 0640 -o root -g "$BROKER_GROUP" /dev/null "$broker_dir/passwd"
  [[ $DRY_RUN == 1 ]] || echo "changed: $broker_dir/passwd"
fi
