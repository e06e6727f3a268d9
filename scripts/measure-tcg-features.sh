#!/usr/bin/env bash
# Prints, for each QEMU CPU model in firmware-profiles/cpu-models.toml, the features this QEMU's
# TCG cannot give (the `unavailable_tcg` lists). QEMU warns once per missing feature at start.
set -euo pipefail
cd "$(dirname "$0")/.."
for m in $(grep -E '^qemu = ' firmware-profiles/cpu-models.toml | cut -d'"' -f2 | sort -u); do
  sock=$(mktemp -u /tmp/vigil-probe-XXXXXX.sock)
  out=$(mktemp)
  qemu-system-x86_64 -accel tcg -machine q35 -cpu "$m" -display none -nodefaults -no-user-config \
    -smp 1 -m 64 -S -monitor none -qmp "unix:$sock,server=on,wait=off" >"$out" 2>&1 &
  pid=$!
  for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  feats=$(grep -o "feature: CPUID[^ ]*" "$out" | sed 's/.*\.//' | sort -u | sed 's/.*/"&"/' | paste -sd, - || true)
  echo "$m = [${feats//,/, }]"
  rm -f "$out" "$sock"
done
