#!/usr/bin/env bash
# Installs what vigil's tests need on a Debian 12 machine, idempotently: a second run with
# everything present changes nothing and takes about a second. Run as root (or with sudo).
set -euo pipefail

# Debian packages the test suite starts or calls.
#   systemd: systemd-analyze, to verify the units in systemd/ and rate their sandbox.
DEBIAN_PACKAGES=(systemd)

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-test-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The Rust components the checks use.
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done
