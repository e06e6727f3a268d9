#!/bin/sh
# Reference implementation of ipmi_sim's chassis_control protocol, for tests (the lab's own is
# `vigil-lab ipmi-chassis`). Configure: chassis_control "/path/chassis-stub.sh --state-dir DIR"
# ipmi_sim appends, after a space, one of:
#   get power            -> print "power:1" or "power:0", exit 0
#   get boot             -> print "boot:none|pxe|default|cdrom|bios", exit 0
#   set power 1|0        -> print nothing, exit 0 (non-zero exit: the IPMI command fails with 0xFF)
#   set reset 1          -> hard reset pulse
#   set shutdown 1       -> soft (ACPI) shutdown request
#   set boot pxe|...     -> boot device for the next boot
#   set identify "S F"   -> identify LED for S seconds, F = force (one argument with a space)
# State: DIR/power (1|0), DIR/boot; every call is appended to DIR/calls.log.
# DIR/mode may hold "fail" (exit 3), "slow" (sleep 5 first), "garbage" (print power:maybe),
# "sticky" (set power is accepted but the power does not change, like a slow power-off).
dir=/tmp
while [ $# -gt 0 ]; do
  case "$1" in
    --state-dir) dir=$2; shift 2;;
    --*) shift 2;;
    *) break;;
  esac
done
[ -f "$dir/power" ] || echo 1 > "$dir/power"
[ -f "$dir/boot" ] || echo default > "$dir/boot"
echo "$(date +%H:%M:%S.%N | cut -c1-12) $*" >> "$dir/calls.log"
case "$(cat "$dir/mode" 2>/dev/null)" in
  fail) echo "lab refused"; exit 3;;
  slow) sleep 5;;
  garbage) echo "power:maybe"; exit 0;;
esac
op=$1; shift
case "$op" in
  get)
    for p in "$@"; do
      case "$p" in
        power) echo "power:$(cat "$dir/power")";;
        boot) echo "boot:$(cat "$dir/boot")";;
        *) echo "unknown parameter $p"; exit 1;;
      esac
    done;;
  set)
    while [ $# -ge 2 ]; do
      case "$1" in
        power) [ "$(cat "$dir/mode" 2>/dev/null)" = sticky ] || echo "$2" > "$dir/power";;
        boot) echo "$2" > "$dir/boot";;
        reset|shutdown|identify) ;;
        *) echo "unknown parameter $1"; exit 1;;
      esac
      shift 2
    done;;
  *) echo "unknown operation $op"; exit 1;;
esac
exit 0
