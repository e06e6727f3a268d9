#!/usr/bin/env bash
# Builds the lab's virtual-node guest from Debian packages only: a kernel QEMU boots directly and a
# busybox initramfs whose init runs `vigil agent` (see README.md next to this script).
#
#   build.sh OUTDIR AGENT_BINARY
#
#   OUTDIR/vmlinux     the Debian kernel, uncompressed (QEMU boots it through its PVH entry: no
#                      in-guest decompression, which costs ~8 s under TCG)
#   OUTDIR/initrd.gz   busybox-static, the kernel modules the guest needs, /init, and AGENT_BINARY
#                      as /bin/vigil (a static binary: the initramfs has no libc)
#   OUTDIR/guest.manifest  the package versions and checksums the two files were made from
#
# The packages are fetched with `apt-get download` (never installed) and unpacked with dpkg-deb into
# the cache (VIGIL_GUEST_CACHE, default .cache/guest at the top of the repository). A warm run
# touches no network, rewrites nothing that is already right and takes well under 2 s. The output is
# reproducible: the same packages and agent give the same bytes (sorted cpio with fixed owners,
# inode numbers and times; gzip without a name or time stamp).
#
# The kernel is the one linux-image-amd64 depends on in the apt lists; pin it (and busybox) with
#   VIGIL_GUEST_KERNEL=linux-image-6.1.0-56-amd64=6.1.192-2 VIGIL_GUEST_BUSYBOX=busybox-static=1:1.35.0-4+deb12u1+b1
# Tools: apt-get, dpkg-deb, depmod (kmod), cpio, gzip, xz or zstd (scripts/install-qemu.sh).
set -euo pipefail

usage() {
  echo "usage: $0 OUTDIR AGENT_BINARY" >&2
  exit 2
}
[ $# -eq 2 ] || usage
OUT=$1
AGENT=$2

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$ROOT/hardware-lab/guest"
CACHE=${VIGIL_GUEST_CACHE:-$ROOT/.cache/guest}
ARCH=amd64
# Every file in the initramfs gets this time (2020-01-01), so the archive depends on content only.
EPOCH_TIME=${SOURCE_DATE_EPOCH:-1577836800}

# The modules the guest loads, in this order, each after its own dependencies (from modules.dep):
# the NICs (virtio-net with its failover helpers, e1000e), the ACPI power button and evdev (busybox
# acpid reads /dev/input/event*; QEMU's system_powerdown presses the button), qemu_fw_cfg (the
# guest reads its parameters from /sys/firmware/qemu_fw_cfg), and virtio_blk (a twin's boot disk,
# which the guest lists so a test can see it arrived).
MODULES=(failover net_failover virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev
  virtio_pci virtio_net e1000e button evdev qemu_fw_cfg virtio_blk)
# Bumped when the way the kernel cache is derived changes, so old caches are redone.
KERNEL_CACHE_FORMAT=1

say() { echo "guest/build.sh: $*" >&2; }
die() {
  say "error: $*"
  exit 1
}

[ -f "$AGENT" ] || die "the agent binary $AGENT does not exist"
[ -x "$AGENT" ] || die "the agent binary $AGENT is not executable"
# An ELF agent must be static: the initramfs has no dynamic loader. A PT_INTERP program header
# (type 3) names one; static and static-pie binaries have none.
le() { od -An -v -tu"$2" -j "$1" -N "$2" "$AGENT" | tr -d ' '; }
if [ "$(od -An -tx1 -N 4 "$AGENT" | tr -d ' \n')" = 7f454c46 ]; then
  phoff=$(le 32 8) phentsize=$(le 54 2) phnum=$(le 56 2)
  for ((i = 0; i < phnum; i++)); do
    if [ "$(le $((phoff + i * phentsize)) 4)" = 3 ]; then
      die "$AGENT is dynamically linked; build it with RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu"
    fi
  done
fi

mkdir -p "$CACHE/debs" "$OUT"
TMP=$(mktemp -d "$CACHE/tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# --- which packages ----------------------------------------------------------------------------

# "PACKAGE VERSION" of the kernel and of busybox-static. apt-cache costs ~0.5 s, so the answer is
# kept, keyed on the apt lists and settings it was computed from.
resolve() {
  if [ -n "${VIGIL_GUEST_KERNEL:-}" ] && [ -n "${VIGIL_GUEST_BUSYBOX:-}" ]; then
    echo "${VIGIL_GUEST_KERNEL%%=*} ${VIGIL_GUEST_KERNEL#*=}"
    echo "${VIGIL_GUEST_BUSYBOX%%=*} ${VIGIL_GUEST_BUSYBOX#*=}"
    return
  fi
  local key memo="$CACHE/resolved"
  key=$(stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* /etc/apt/sources.list* \
    /etc/apt/sources.list.d/* /etc/apt/preferences* 2>/dev/null | md5sum | cut -c1-32)
  if [ -f "$memo" ] && [ "$(head -n1 "$memo")" = "$key" ]; then
    sed 1d "$memo"
    return
  fi
  local show kpkg kver bver
  show=$(apt-cache show --no-all-versions "linux-image-$ARCH" "busybox-static:$ARCH" 2>/dev/null) ||
    die "apt-cache knows no linux-image-$ARCH or busybox-static (apt-get update?)"
  # linux-image-amd64 is a metapackage: Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)
  read -r kpkg kver < <(echo "$show" | sed -nE \
    's/^Depends: .*(linux-image-[0-9][^ ,]*) \(= ([^)]+)\).*/\1 \2/p' | head -n1) || true
  bver=$(echo "$show" | awk '/^Package: busybox-static/ { p = 1 } p && /^Version:/ { print $2; exit }')
  if [ -z "${kpkg:-}" ] || [ -z "${kver:-}" ]; then
    die "cannot find the versioned kernel linux-image-$ARCH depends on"
  fi
  [ -n "$bver" ] || die "cannot find the version of busybox-static"
  [ -n "${VIGIL_GUEST_KERNEL:-}" ] && { kpkg=${VIGIL_GUEST_KERNEL%%=*}; kver=${VIGIL_GUEST_KERNEL#*=}; }
  [ -n "${VIGIL_GUEST_BUSYBOX:-}" ] && bver=${VIGIL_GUEST_BUSYBOX#*=}
  printf '%s\n%s %s\nbusybox-static %s\n' "$key" "$kpkg" "$kver" "$bver" >"$memo.$$"
  mv "$memo.$$" "$memo"
  sed 1d "$memo"
}

{
  read -r KPKG KVER
  read -r BPKG BVER
} < <(resolve)
[ -n "${BVER:-}" ] || die "could not resolve the guest's packages"

# The .deb of PACKAGE VERSION in the cache, downloaded when missing. Prints its path.
fetch() {
  local pkg=$1 ver=$2 deb
  deb="$CACHE/debs/${pkg}_${ver//:/%3a}_$ARCH.deb"
  if [ ! -s "$deb" ]; then
    say "downloading $pkg $ver"
    (cd "$TMP" && apt-get download -qq -o APT::Sandbox::User=root "$pkg:$ARCH=$ver" >&2) ||
      die "apt-get download $pkg=$ver failed"
    local debs=("$TMP/${pkg}"_*.deb) got
    got=${debs[0]}
    [ -f "$got" ] || die "apt-get download left no $pkg .deb"
    [ "$(dpkg-deb -f "$got" Package Version | tr '\n' ' ')" = "Package: $pkg Version: $ver " ] ||
      die "$got is not $pkg $ver"
    mv "$got" "$deb"
  fi
  echo "$deb"
}

# --- the kernel: vmlinux and the modules -------------------------------------------------------

KDIR="$CACHE/kernel/${KPKG}_$KVER"
KSTAMP="format=$KERNEL_CACHE_FORMAT modules=${MODULES[*]}"

# Writes the uncompressed kernel inside bzImage $1 to $2. The bzImage header says where the payload
# is (setup_sects at 0x1f1, payload_offset and payload_length at 0x248 and 0x24c, boot protocol 2.08);
# its magic says how it is compressed (Debian 12: xz, fd 37 7a 58 5a 00).
extract_vmlinux() {
  local bz=$1 out=$2 hdr setup off len start magic
  hdr=$(od -An -v -tu1 -j $((0x1f1)) -N 1 "$bz" | tr -d ' ')
  setup=${hdr:-0}
  [ "$setup" -eq 0 ] && setup=4
  off=$(od -An -v -tu4 -j $((0x248)) -N 4 "$bz" | tr -d ' ')
  len=$(od -An -v -tu4 -j $((0x24c)) -N 4 "$bz" | tr -d ' ')
  start=$(((setup + 1) * 512 + off))
  magic=$(od -An -v -tx1 -j "$start" -N 6 "$bz" | tr -d ' \n')
  payload() { dd if="$bz" bs=64K iflag=skip_bytes,count_bytes skip="$start" count="$len" status=none; }
  case "$magic" in
  fd377a585a00) payload | xz -dc --single-stream >"$out" ;;
  28b52ffd*) payload | zstd -dcq >"$out" ;;
  1f8b*) payload | gzip -dc >"$out" ;;
  *) die "unknown kernel compression in $bz (payload magic $magic at $start)" ;;
  esac
  [ "$(od -An -tx1 -N 4 "$out" | tr -d ' \n')" = 7f454c46 ] || die "the payload of $bz is not an ELF kernel"
}

if [ ! -f "$KDIR/stamp" ] || [ "$(cat "$KDIR/stamp")" != "$KSTAMP" ]; then
  kdeb=$(fetch "$KPKG" "$KVER")
  say "unpacking $KPKG $KVER"
  x="$TMP/kernel"
  mkdir -p "$x"
  dpkg-deb -x "$kdeb" "$x"
  kernels=("$x"/boot/vmlinuz-*)
  bz=${kernels[0]}
  [ -f "$bz" ] || die "$kdeb has no boot/vmlinuz-*"
  krel=${bz##*/vmlinuz-}
  # The package has no modules.dep (depmod runs at install time): make it.
  depmod -b "$x" "$krel" || die "depmod failed on $kdeb"
  mdir="$x/lib/modules/$krel"
  new="$TMP/kdir"
  mkdir -p "$new/modules"
  extract_vmlinux "$bz" "$new/vmlinux"
  sha256sum <"$new/vmlinux" | cut -d' ' -f1 >"$new/vmlinux.sha256"
  # Load order: each module after its dependencies (depth first), each once.
  declare -A seen=()
  order=()
  path_of() { sed -nE "s#^([^:]*/$1\\.ko(\\.[a-z]+)?):.*#\\1#p" "$mdir/modules.dep" | head -n1; }
  add() {
    local name=$1 path dep
    [ -n "${seen[$name]:-}" ] && return
    path=$(path_of "$name")
    if [ -z "$path" ]; then
      # Built into this kernel: nothing to load.
      grep -qE "/$name\\.ko\$" "$mdir/modules.builtin" || die "$KPKG has no module $name"
      seen[$name]=builtin
      return
    fi
    seen[$name]=1
    for dep in $(sed -nE "s#^$path: *##p" "$mdir/modules.dep" | tr ' ' '\n' | tac); do
      dep=${dep##*/}
      add "${dep%%.ko*}"
    done
    order+=("$name")
    case "$path" in
    *.ko) cp "$mdir/$path" "$new/modules/$name.ko" ;;
    *.ko.xz) xz -dc "$mdir/$path" >"$new/modules/$name.ko" ;;
    *.ko.zst) zstd -dcq "$mdir/$path" >"$new/modules/$name.ko" ;;
    *.ko.gz) gzip -dc "$mdir/$path" >"$new/modules/$name.ko" ;;
    *) die "unknown module format $path" ;;
    esac
  }
  for m in "${MODULES[@]}"; do add "$m"; done
  printf '%s\n' "${order[@]}" >"$new/modules.load"
  echo "$krel" >"$new/release"
  echo "$KSTAMP" >"$new/stamp"
  rm -rf "$x" "$KDIR"
  mkdir -p "$(dirname "$KDIR")"
  mv "$new" "$KDIR"
fi

# --- busybox -----------------------------------------------------------------------------------

# The cache keeps busybox as a ready tree: bin/busybox and a symlink per applet in its place (bin/sh,
# sbin/poweroff, usr/bin/nc, ...), so a build copies it in one go.
BDIR="$CACHE/busybox/${BVER//:/%3a}"
if [ ! -x "$BDIR/root/bin/busybox" ]; then
  bdeb=$(fetch "$BPKG" "$BVER")
  mkdir -p "$TMP/bb"
  dpkg-deb -x "$bdeb" "$TMP/bb"
  [ -x "$TMP/bb/bin/busybox" ] || die "$bdeb has no bin/busybox"
  bb="$TMP/bbroot"
  mkdir -p "$bb/bin"
  cp "$TMP/bb/bin/busybox" "$bb/bin/busybox"
  "$bb/bin/busybox" --list-full | LC_ALL=C sort | while read -r applet; do
    mkdir -p "$bb/$(dirname "$applet")"
    [ -e "$bb/$applet" ] || ln -s /bin/busybox "$bb/$applet"
  done
  rm -rf "$BDIR"
  mkdir -p "$BDIR"
  mv "$bb" "$BDIR/root"
fi

# --- the initramfs -----------------------------------------------------------------------------

R="$TMP/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,etc/acpi/PWRF,lib/modules,var/log,root}
cp -a "$BDIR/root/." "$R/"
cp "$AGENT" "$R/bin/vigil"
cp "$KDIR"/modules/*.ko "$R/lib/modules/"
cp "$KDIR/modules.load" "$R/etc/modules"
cp "$HERE/init" "$R/init"
cp "$HERE/udhcpc.script" "$R/etc/udhcpc.script"
# busybox acpid runs /etc/acpi/<ACTION>/<PARAMETER> for an event: the power button is PWRF/00000080.
printf '#!/bin/sh\necho "vigil-guest: ACPI power button: powering off" >/dev/console\nexec poweroff -f\n' \
  >"$R/etc/acpi/PWRF/00000080"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"

find "$R" -type d -exec chmod 0755 {} +
find "$R" -type f -exec chmod 0644 {} +
chmod 0755 "$R/init" "$R/bin/busybox" "$R/bin/vigil" "$R/etc/udhcpc.script" "$R/etc/acpi/PWRF/00000080"
chmod 1777 "$R/tmp"
chmod 0700 "$R/root"
find "$R" -exec touch -h -d "@$EPOCH_TIME" {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort |
  cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -n -6 >"$TMP/initrd.gz"

# Replaces $2 with $1 only when they differ, so a warm run leaves the outputs (and their times) alone.
install_if_changed() {
  if ! cmp -s "$1" "$2"; then
    cp "$1" "$2.new.$$"
    mv "$2.new.$$" "$2"
  fi
}
install_if_changed "$TMP/initrd.gz" "$OUT/initrd.gz"
install_if_changed "$KDIR/vmlinux" "$OUT/vmlinux"

{
  echo "kernel $KPKG $KVER $(cat "$KDIR/release")"
  echo "busybox $BPKG $BVER"
  echo "modules $(tr '\n' ' ' <"$KDIR/modules.load" | sed 's/ $//')"
  echo "agent $(sha256sum <"$AGENT" | cut -d' ' -f1)"
  echo "vmlinux $(cat "$KDIR/vmlinux.sha256")"
  echo "initrd.gz $(sha256sum <"$OUT/initrd.gz" | cut -d' ' -f1)"
} >"$TMP/manifest"
install_if_changed "$TMP/manifest" "$OUT/guest.manifest"
