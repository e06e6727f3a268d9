#!/usr/bin/env bash
# Prepares this machine so that the libvirt driver's tests can run a real libvirtd against the
# real QEMU, idempotently (a second run changes nothing). Debian packages: libvirt-clients
# libvirt-daemon libvirt-daemon-driver-qemu libxml2-utils (installed by install-test-deps.sh).
#
# Without systemd or dbus here, a privileged libvirtd needs (see ../shared/PEERS.md): the system
# user and groups it resolves before reading qemu.conf, its folders, and a qemu.conf that runs
# QEMU as root without cgroups or a security driver. The tests start their own libvirtd on a
# private socket and stop it by its PID; nothing here starts a daemon.
#
# /etc/libvirt/qemu.conf: written when absent; an existing file that is not ours is kept as
# qemu.conf.before-vigil.
set -euo pipefail

getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
  useradd --system --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin \
    -g libvirt-qemu -G kvm libvirt-qemu
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt/qemu

CONF=/etc/libvirt/qemu.conf
WANT='# Written by vigil scripts/install-libvirt.sh for its tests: QEMU as root, no cgroups, no
# security driver (no systemd or dbus on this machine).
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"'
if [ "$(cat "$CONF" 2>/dev/null)" != "$WANT" ]; then
  if [ -f "$CONF" ] && ! grep -q "vigil scripts/install-libvirt.sh" "$CONF"; then
    cp -a "$CONF" "$CONF.before-vigil"
  fi
  mkdir -p /etc/libvirt
  printf '%s\n' "$WANT" >"$CONF"
  echo "install-libvirt: wrote $CONF" >&2
fi
