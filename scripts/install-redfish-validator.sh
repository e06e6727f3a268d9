#!/usr/bin/env bash
# Installs the DMTF Redfish Service Validator and the DMTF Redfish CSDL schemas it validates against,
# idempotently and so that validation then runs with no network at all:
#
#   .venv/                          a Python venv with redfish-service-validator (rf_service_validator),
#                                   the DMTF redfish library it depends on, OpenStack's sushy and
#                                   sushy-tools (its Redfish emulator)
#   .cache/redfish-validator-wheels the wheels it was installed from (the venv can be rebuilt offline)
#   .cache/redfish-csdl/*.xml       the DMTF Redfish CSDL (DSP8010 csdl/) and the SNIA Swordfish CSDL
#                                   for --schema_directory (XCC links StoragePoolCollection, a
#                                   Swordfish type); where both bundles have a file, Redfish's is kept
#
# The validator fetches schemas from the internet unless told otherwise; run it with the local copy:
#   .venv/bin/rf_service_validator --rhost https://HOST:PORT --user U --password P \
#     --authtype Session|Basic --schema_directory .cache/redfish-csdl --skipschema --logdir DIR
#
# The CSDL comes from the crates.io crate nv-redfish-schema (Apache-2.0), which carries the DMTF files
# unchanged in redfish-csdl/csdl/ (the schema files are DMTF's, BSD-3-Clause) and SNIA's Swordfish
# CSDL in swordfish-csdl/csdl-schema/ (copyright SNIA; the files state no licence). It is fetched with
# `cargo fetch` in a throwaway crate: a download into cargo's cache, nothing is compiled.
# redfish-service-validator and its DMTF dependencies (redfish, redfish_utilities) are BSD-3-Clause.
#
# A warm run (everything present) prints nothing and changes nothing. Override the places with
# VIGIL_VENV, VIGIL_REDFISH_CSDL and VIGIL_WHEEL_CACHE, the interpreter with PYTHON.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VALIDATOR=redfish-service-validator
VALIDATOR_VERSION=3.1.8
CSDL_CRATE=nv-redfish-schema
CSDL_CRATE_VERSION=0.22.1
VENV=${VIGIL_VENV:-$ROOT/.venv}
CSDL_DIR=${VIGIL_REDFISH_CSDL:-$ROOT/.cache/redfish-csdl}
WHEELS=${VIGIL_WHEEL_CACHE:-$ROOT/.cache/redfish-validator-wheels}
PYTHON=${PYTHON:-python3}

say() { echo "install-redfish-validator: $*" >&2; }

# --- the validator, in a venv --------------------------------------------------------------------

validator_ok() {
  [ -x "$VENV/bin/rf_service_validator" ] || return 1
  local v
  v=$("$VENV/bin/python" -c \
    'import importlib.metadata as m; print(m.version("redfish_service_validator"))' 2>/dev/null) ||
    return 1
  [ "$v" = "$VALIDATOR_VERSION" ]
}

if ! validator_ok; then
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    say "creating the venv $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # Wheels first (a download only when the cache lacks them), then an install from the cache alone,
  # so a lost venv is rebuilt offline.
  if ! "$VENV/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
    "$VALIDATOR==$VALIDATOR_VERSION" 2>/dev/null; then
    say "downloading $VALIDATOR $VALIDATOR_VERSION and its dependencies into $WHEELS"
    mkdir -p "$WHEELS"
    "$VENV/bin/pip" download -q --disable-pip-version-check -d "$WHEELS" \
      "$VALIDATOR==$VALIDATOR_VERSION"
    say "installing $VALIDATOR $VALIDATOR_VERSION into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
      "$VALIDATOR==$VALIDATOR_VERSION"
  fi
  validator_ok || {
    say "error: $VENV/bin/rf_service_validator $VALIDATOR_VERSION is still missing after the install"
    exit 1
  }
fi

# --- OpenStack's Redfish client (sushy) and emulator (sushy-tools), peers we did not write -----

for pkg in sushy==5.14.0 sushy-tools==2.2.0; do
  name=${pkg%%==*} version=${pkg##*==}
  if ! "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version(sys.argv[1]) != sys.argv[2])' \
    "$name" "$version" 2>/dev/null; then
    if ! "$VENV/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
      "$pkg" 2>/dev/null; then
      say "downloading $pkg and its dependencies into $WHEELS"
      mkdir -p "$WHEELS"
      "$VENV/bin/pip" download -q --disable-pip-version-check -d "$WHEELS" "$pkg"
      "$VENV/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$WHEELS" "$pkg"
    fi
  fi
done

# --- the DMTF CSDL ----------------------------------------------------------------------------

STAMP="$CSDL_DIR/.source"
STAMP_TEXT="$CSDL_CRATE $CSDL_CRATE_VERSION redfish-csdl/csdl swordfish-csdl/csdl-schema"

csdl_ok() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ] &&
    [ -f "$CSDL_DIR/ServiceRoot_v1.xml" ] && [ -f "$CSDL_DIR/Resource_v1.xml" ] &&
    [ -f "$CSDL_DIR/RedfishExtensions_v1.xml" ] && [ -f "$CSDL_DIR/StoragePoolCollection_v1.xml" ]
}

if ! csdl_ok; then
  command -v cargo >/dev/null || {
    say "error: cargo is needed to fetch $CSDL_CRATE"
    exit 1
  }
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/vigil-csdl.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/src"
  cat >"$tmp/Cargo.toml" <<EOF
[package]
name = "vigil-csdl-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
$CSDL_CRATE = "=$CSDL_CRATE_VERSION"

[workspace]
EOF
  echo 'fn main() {}' >"$tmp/src/main.rs"
  # From cargo's cache when it has the crate (offline), else from crates.io.
  if ! cargo fetch --quiet --offline --manifest-path "$tmp/Cargo.toml" 2>/dev/null; then
    say "fetching $CSDL_CRATE $CSDL_CRATE_VERSION from crates.io (download only, no build)"
    cargo fetch --quiet --manifest-path "$tmp/Cargo.toml"
  fi
  src=$(cargo metadata --quiet --offline --format-version 1 --manifest-path "$tmp/Cargo.toml" |
    "$PYTHON" -c '
import json, os, sys
name = sys.argv[1]
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == name:
        print(os.path.dirname(p["manifest_path"]))
' "$CSDL_CRATE")
  if [ -z "$src" ] || [ ! -f "$src/redfish-csdl/csdl/ServiceRoot_v1.xml" ]; then
    say "error: no redfish-csdl/csdl/ServiceRoot_v1.xml in $CSDL_CRATE $CSDL_CRATE_VERSION ($src)"
    exit 1
  fi
  say "copying the DMTF CSDL into $CSDL_DIR"
  # Fill a sibling folder and swap it in, so an interrupted copy never looks complete.
  mkdir -p "$(dirname "$CSDL_DIR")"
  new="$CSDL_DIR.new.$$"
  rm -rf "$new"
  mkdir "$new"
  cp "$src"/redfish-csdl/csdl/*.xml "$new/"
  # Swordfish's copies of Redfish schemas (ServiceRoot, Endpoint, ...) are older: never overwrite.
  for f in "$src"/swordfish-csdl/csdl-schema/*.xml; do
    [ -e "$new/${f##*/}" ] || cp "$f" "$new/"
  done
  echo "$STAMP_TEXT" >"$new/.source"
  rm -rf "$CSDL_DIR"
  mv "$new" "$CSDL_DIR"
  csdl_ok || {
    say "error: $CSDL_DIR is incomplete after the copy"
    exit 1
  }
fi
