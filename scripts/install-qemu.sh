#!/usr/bin/env bash
# Installs what vigil's virtual nodes need on a Debian 12 machine, idempotently: QEMU (TCG or KVM)
# and the tools that build and drive the lab's guest (hardware-lab/guest/build.sh).
#
#   qemu-system-x86   from bookworm-backports. The machine ships qemu-utils 10.0 from backports,
#                     which Breaks qemu-system-common (<< 8.0), so bookworm's QEMU 7.2 cannot be
#                     installed next to it ("held broken packages").
#   busybox-static    the guest's userland (sh, udhcpc, acpid, nc, ...), one static binary
#   cpio              packs the guest's initramfs
#   socat             talks to QEMU's QMP socket from a shell
#   xz-utils zstd     unpack the kernel payload inside the Debian bzImage, and .ko.xz modules
#   kmod              modinfo/depmod for the guest's kernel modules
#
# Everything except QEMU comes from bookworm itself: `-t bookworm-backports` on the rest would drag in
# a newer systemd. The backports source is added (if missing) with the same mirror and keyring as the
# machine's own Debian source, as /etc/apt/sources.list.d/bookworm-backports.sources.
#
# A warm run (everything present) prints nothing, touches no network and takes well under a second:
# `apt-get update` runs only when something must be installed. Run as root.
set -euo pipefail

BACKPORTS_PACKAGES=(qemu-system-x86)
DEBIAN_PACKAGES=(busybox-static cpio socat xz-utils zstd kmod)
SOURCES_FILE=/etc/apt/sources.list.d/bookworm-backports.sources

say() { echo "install-qemu: $*" >&2; }

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# Every apt source file, one-line (.list) and deb822 (.sources) alike.
source_files() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && echo "$f"
  done
  return 0
}

# True when an enabled source already offers the bookworm-backports suite.
have_backports_source() {
  local f
  while read -r f; do
    case "$f" in
    *.sources)
      # deb822: a stanza whose Suites name bookworm-backports and that is not Enabled: no.
      awk '
        function flush() { if (bpo && !off) found = 1; bpo = 0; off = 0 }
        /^[[:space:]]*$/ { flush(); next }
        /^[[:space:]]*#/ { next }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm-backports") bpo = 1 }
        /^Enabled:[[:space:]]*no/ { off = 1 }
        END { flush(); exit found ? 0 : 1 }
      ' "$f" && return 0
      ;;
    *)
      grep -qE '^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+[[:space:]]+bookworm-backports([[:space:]]|$)' \
        "$f" && return 0
      ;;
    esac
  done < <(source_files)
  return 1
}

# Prints "URI KEYRING" of the machine's bookworm (main) source; KEYRING may be empty.
debian_mirror() {
  local f
  while read -r f; do
    case "$f" in
    *.sources)
      awk '
        function flush() {
          if (bookworm && uri != "" && !off) { print uri, key; found = 1; exit }
          bookworm = 0; uri = ""; key = ""; off = 0
        }
        /^[[:space:]]*$/ { flush(); next }
        /^[[:space:]]*#/ { next }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") bookworm = 1 }
        /^URIs:/ { uri = $2 }
        /^Signed-By:/ { key = $2 }
        /^Enabled:[[:space:]]*no/ { off = 1 }
        END { if (!found) flush() }
      ' "$f"
      ;;
    *)
      # One-line: deb [opt=val ...] URI SUITE COMPONENT...
      awk '
        $1 != "deb" { next }
        {
          key = ""; i = 2
          if ($2 ~ /^\[/) {
            for (; i <= NF; i++) {
              o = $i; gsub(/[][]/, "", o)
              if (o ~ /^signed-by=/) { sub(/^signed-by=/, "", o); key = o }
              if ($i ~ /\]$/) { i++; break }
            }
          }
          if ($(i + 1) == "bookworm") { print $i, key; exit }
        }
      ' "$f"
      ;;
    esac
  done < <(source_files) | head -n1
}

add_backports_source() {
  local uri key
  read -r uri key < <(debian_mirror) || true
  uri=${uri:-http://deb.debian.org/debian}
  if [ -z "${key:-}" ] && [ -f /usr/share/keyrings/debian-archive-keyring.gpg ]; then
    key=/usr/share/keyrings/debian-archive-keyring.gpg
  fi
  say "adding the bookworm-backports source ($uri) as $SOURCES_FILE"
  {
    echo "# Added by vigil scripts/install-qemu.sh: QEMU comes from bookworm-backports."
    echo "Types: deb"
    echo "URIs: $uri"
    echo "Suites: bookworm-backports"
    echo "Components: main"
    [ -n "${key:-}" ] && echo "Signed-By: $key"
  } >"$SOURCES_FILE.tmp"
  mv "$SOURCES_FILE.tmp" "$SOURCES_FILE"
}

missing_bpo=()
for p in "${BACKPORTS_PACKAGES[@]}"; do installed "$p" || missing_bpo+=("$p"); done
missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done

have_backports_source || add_backports_source

[ ${#missing_bpo[@]} -eq 0 ] && [ ${#missing[@]} -eq 0 ] && exit 0

export DEBIAN_FRONTEND=noninteractive
say "apt-get update"
apt-get update -qq
if [ ${#missing_bpo[@]} -gt 0 ]; then
  say "installing ${missing_bpo[*]} from bookworm-backports"
  apt-get install -y -qq --no-install-recommends -t bookworm-backports "${missing_bpo[@]}"
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

for p in "${BACKPORTS_PACKAGES[@]}" "${DEBIAN_PACKAGES[@]}"; do
  installed "$p" || {
    say "error: $p is still missing after the install"
    exit 1
  }
done
