#!/usr/bin/env bash
# Lab certificates for the broker's TLS listener: a CA, the broker's server certificate and
# one client certificate per device (CN = device id).
#
#   scripts/make_certs.sh [-o DIR] [-s SAN]... [-f] [-d DAYS] [DEVICE...]
#
#   -o DIR   where everything goes (default: ./certs)
#               DIR/ca.key  ca.crt                  the lab CA (ca.key never leaves the server)
#               DIR/server.key  server.crt          the broker's certificate
#               DIR/devices/<id>.key  <id>.crt      one per device
#   -s SAN   a DNS name or IP address of the broker, repeatable (default: localhost and
#            127.0.0.1); the server certificate is re-issued when the list changes
#   -f       re-issue the named devices' certificates with new keys (rotation)
#   -d DAYS  validity of new server and device certificates (default 825)
#
# Idempotent: existing keys and certificates are kept (unless -f or the SANs changed), so it
# is safe to run again to add a device. Private keys are written with mode 600.
set -euo pipefail

out=./certs
days=825
force=0
sans=()

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while getopts "o:s:fd:h" opt; do
    case "$opt" in
        o) out=$OPTARG ;;
        s) sans+=("$OPTARG") ;;
        f) force=1 ;;
        d) days=$OPTARG ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))

[[ $days =~ ^[1-9][0-9]*$ ]] || { echo "invalid -d: $days" >&2; exit 2; }
[[ -n $out ]] || { echo "-o must not be empty" >&2; exit 2; }
if [[ ${#sans[@]} -eq 0 ]]; then
    sans=(localhost 127.0.0.1)
fi

# Same rule as tilebridge_protocol.topics.check_device_id: the name goes into a subject and
# a file name, so nothing but letters, digits, '_', '.', '-'.
valid_name() {
    [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$ && $1 != *..* ]]
}
for device in "$@"; do
    valid_name "$device" || { echo "invalid device id: $device" >&2; exit 2; }
done
san_list=""
for san in "${sans[@]}"; do
    if [[ $san =~ ^[0-9.]+$ || $san == *:* ]]; then
        san_list+="${san_list:+,}IP:$san"
    elif [[ $san =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
        san_list+="${san_list:+,}DNS:$san"
    else
        echo "invalid SAN: $san" >&2
        exit 2
    fi
done

umask 077
mkdir -p "$out/devices"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Minimal configs, so nothing from the system's openssl.cnf ends up in a certificate.
printf '[req]\ndistinguished_name = dn\n[dn]\n' >"$work/req.cnf"
printf '%s\n' \
    '[req]' 'distinguished_name = dn' 'x509_extensions = v3_ca' 'prompt = no' \
    '[dn]' 'CN = tilebridge lab CA' \
    '[v3_ca]' 'basicConstraints = critical, CA:TRUE, pathlen:0' \
    'keyUsage = critical, keyCertSign, cRLSign' 'subjectKeyIdentifier = hash' >"$work/ca.cnf"
printf '%s\n' \
    'basicConstraints = critical, CA:FALSE' \
    'keyUsage = critical, digitalSignature, keyEncipherment' \
    'extendedKeyUsage = serverAuth' "subjectAltName = $san_list" \
    'subjectKeyIdentifier = hash' 'authorityKeyIdentifier = keyid' >"$work/server.ext"
printf '%s\n' \
    'basicConstraints = critical, CA:FALSE' 'keyUsage = critical, digitalSignature' \
    'extendedKeyUsage = clientAuth' \
    'subjectKeyIdentifier = hash' 'authorityKeyIdentifier = keyid' >"$work/client.ext"

new_key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    chmod 600 "$1"
}

# Sign a request with the CA. $1 key, $2 certificate, $3 subject, $4 extensions file.
issue() {
    openssl req -new -config "$work/req.cnf" -key "$1" -subj "$3" -out "$work/req.csr"
    openssl x509 -req -in "$work/req.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
        -CAcreateserial -CAserial "$out/ca.srl" -days "$days" -sha256 \
        -extfile "$4" -out "$2.tmp" 2>/dev/null
    chmod 644 "$2.tmp"
    mv "$2.tmp" "$2"
}

if [[ ! -s $out/ca.key || ! -s $out/ca.crt ]]; then
    new_key "$out/ca.key"
    openssl req -new -x509 -config "$work/ca.cnf" -key "$out/ca.key" -days 3650 -sha256 \
        -out "$out/ca.crt"
    chmod 644 "$out/ca.crt"
    # Certificates of an earlier CA would no longer verify: issue them again below.
    rm -f "$out/server.crt" "$out/server.sans"
    force=1
    echo "created CA $out/ca.crt" >&2
fi

if [[ ! -s $out/server.key || ! -s $out/server.crt ||
    $(cat "$out/server.sans" 2>/dev/null || true) != "$san_list" ]]; then
    [[ -s $out/server.key ]] || new_key "$out/server.key"
    issue "$out/server.key" "$out/server.crt" "/CN=${sans[0]}" "$work/server.ext"
    printf '%s\n' "$san_list" >"$out/server.sans"
    chmod 644 "$out/server.sans"
    echo "issued server certificate for $san_list" >&2
fi

for device in "$@"; do
    key=$out/devices/$device.key
    crt=$out/devices/$device.crt
    if [[ $force -eq 1 || ! -s $key || ! -s $crt ]]; then
        new_key "$work/device.key"
        issue "$work/device.key" "$crt" "/CN=$device" "$work/client.ext"
        mv "$work/device.key" "$key"
        echo "issued client certificate $crt" >&2
    fi
done
