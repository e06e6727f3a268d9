#!/usr/bin/env bash
# vigil's main job on a fresh Debian 12 machine: install what the lab needs (QEMU from
# bookworm-backports, busybox, the guest kernel's package, openipmi), build vigil and the lab, build the
# static agent and the tiny guest the twins boot, then run `vigil demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-qemu.sh
# The lab's IPMI BMCs are the real OpenIPMI ipmi_sim (Debian package openipmi).
if ! dpkg-query -W -f='${Status}' openipmi 2>/dev/null | grep -q "install ok installed"; then
  echo "== installing openipmi (the lab's IPMI BMCs)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends openipmi >/dev/null
fi
echo "== building vigil and the lab" >&2
cargo build -q --workspace --bins
echo "== building the guest (static agent, kernel and initrd from Debian packages)" >&2
RUSTFLAGS='-C target-feature=+crt-static' cargo build -q --profile guest --target x86_64-unknown-linux-gnu --bin vigil
hardware-lab/guest/build.sh target/guest target/x86_64-unknown-linux-gnu/guest/vigil
exec target/debug/vigil demo --guest target/guest "$@"
