#!/usr/bin/env bash
# Installs what vigil's tests need on a Debian 12 machine, idempotently: a second run with
# everything present changes nothing and takes about a second. Run as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the test suite starts or calls.
#   systemd:          systemd-analyze, to verify the units in systemd/ and rate their sandbox.
#   chromium, chromium-driver: the operator page is tested in a real headless browser.
#   fence-agents:     fence_redfish and fence_ipmilan, the peers the fence benchmark compares against.
#   openipmi:         ipmi_sim and sdrcomp, the lab's real IPMI BMCs.
#   ipmitool:         the IPMI client the driver's readings are compared with.
#   python3-venv:     the venv of the Python tools below; jq: the benchmark scripts.
#   libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu libxml2-utils: the libvirt
#                     driver's tests (virsh, a real libvirtd, virt-xml-validate with xmllint).
DEBIAN_PACKAGES=(systemd chromium fence-agents openipmi ipmitool python3-venv jq
  libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu libxml2-utils)

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-test-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# QEMU (from bookworm-backports), busybox and friends, for the virtual nodes.
scripts/install-qemu.sh

# What a real libvirtd needs here (users, folders, qemu.conf); the tests start their own daemon.
scripts/install-libvirt.sh

# Python tools in .venv: the DMTF Redfish Service Validator with its schemas, and two Redfish
# clients we did not write (DMTF redfish, OpenStack sushy) that the lab must serve.
scripts/install-redfish-validator.sh

# The Rust components the checks use, and the target the guest's static agent is built for.
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done
