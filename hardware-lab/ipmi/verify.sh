#!/usr/bin/env bash
# Verifies the ipmi_sim recipe in this folder against the real OpenIPMI ipmi_sim and ipmitool:
# renders the templates the way the lab does, starts one BMC on 127.0.0.1, and checks the
# chassis_control protocol, every fault's console lines (faults.tsv), the SEL clock, the watchdog
# and Get Chassis Status. Needs: openipmi ipmitool python3. Takes ~45 s. Prints one line per check
# and "N passed, N failed"; exits non-zero on a failure.
#   PORT=29623 ./verify.sh        (uses PORT (UDP), PORT+1 (console), PORT+2 (host), all on 127.0.0.1)
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
PORT=${PORT:-29623}
CPORT=$((PORT + 1))
HPORT=$((PORT + 2))
NAME=verify1
USER_=admin
PASS=Lab0nly5ecret
WORK=$(mktemp -d /tmp/vigil-ipmi-verify.XXXXXX)
PID=
HOSTPID=
pass=0
fail=0

cleanup() {
  [ -n "$HOSTPID" ] && kill "$HOSTPID" 2>/dev/null
  [ -n "$PID" ] && kill "$PID" 2>/dev/null
  [ -n "$PID" ] && wait "$PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

ok() { pass=$((pass + 1)); echo "ok   - $1"; }
ko() { fail=$((fail + 1)); echo "FAIL - $1"; [ $# -gt 1 ] && printf '%s\n' "$2" | sed 's/^/       | /'; }
# expect DESC REGEX TEXT: TEXT matches the extended regex
expect() { if printf '%s\n' "$3" | grep -Eq -- "$2"; then ok "$1"; else ko "$1 (want /$2/)" "$3"; fi; }
ipmi() { ipmitool -I lanplus -C 3 -H 127.0.0.1 -p "$PORT" -U "$USER_" -P "$PASS" "$@" 2>&1; }
ms() { echo $(( $(date +%s%N) / 1000000 )); }

# console LINE...: one TCP connection, each line sent with "\n", reply read up to the "> " prompt.
# Prints lines starting with "**" (ipmi_sim's error marker).
console() {
  local chunk line
  exec 3<>"/dev/tcp/127.0.0.1/$CPORT" || { echo "**no console"; return; }
  IFS= read -r -d '>' -t 2 chunk <&3        # telnet negotiation + first prompt
  for line in "$@"; do
    printf '%s\n' "$line" >&3
    IFS= read -r -d '>' -t 2 chunk <&3 || { echo "**no prompt after: $line"; break; }
    printf '%s' "$chunk" | tr -d '\r' | grep '^\*\*'
  done
  exec 3>&- 3<&-
}
fault_lines() { awk -F'\t' -v f="$1" -v p="$2" '$1 == f && $2 == p { print $3 }' "$HERE/faults.tsv"; }
sel_count() { ipmi sel list | grep -c '|'; }
sel_since() { ipmi sel elist | tail -n +"$(( $1 + 1 ))"; }

# --- render, as the lab will (sed stands in for the lab's templating) ---------------------------
mkdir -p "$WORK/state/ipmi_sim/$NAME" "$WORK/chassis"
GUID=$(printf '%s' "$NAME" | md5sum | cut -c1-32)
CC="$HERE/chassis-stub.sh --state-dir $WORK/chassis"
for f in lan.conf node.emu; do
  sed -e "s|{{NAME}}|$NAME|g" -e "s|{{PORT}}|$PORT|g" -e "s|{{CONSOLE_PORT}}|$CPORT|g" \
      -e "s|{{HOST_PORT}}|$HPORT|g" -e "s|{{USER}}|$USER_|g" -e "s|{{PASSWORD}}|$PASS|g" \
      -e "s|{{GUID}}|$GUID|g" -e "s|{{CHASSIS_CONTROL}}|$CC|g" "$HERE/$f.tmpl" > "$WORK/$f"
done
if grep -q '{{' "$WORK/lan.conf" "$WORK/node.emu"; then ko "templates fully substituted"; else ok "templates fully substituted"; fi
out=$(sdrcomp -8 -o "$WORK/state/ipmi_sim/$NAME/sdr.20.main" "$HERE/node.sdrs" 2>&1) \
  && ok "sdrcomp -8 compiles node.sdrs" || ko "sdrcomp -8 compiles node.sdrs" "$out"

# --- start --------------------------------------------------------------------------------------
t0=$(ms)
ipmi_sim -c "$WORK/lan.conf" -f "$WORK/node.emu" -s "$WORK/state" -n > "$WORK/sim.out" 2> "$WORK/sim.err" &
PID=$!
ready=
for _ in $(seq 1 100); do
  if ipmitool -I lanplus -C 3 -H 127.0.0.1 -p "$PORT" -U "$USER_" -P "$PASS" -N 1 -R 1 raw 0x06 0x01 >/dev/null 2>&1; then
    ready=$(( $(ms) - t0 )); break
  fi
  sleep 0.05
done
[ -n "$ready" ] && ok "ipmi_sim answers RMCP+ (-C 3) after ${ready} ms" || { ko "ipmi_sim answers" "$(cat "$WORK/sim.err")"; exit 1; }
rss=$(awk '/VmRSS/ { print $2 }' "/proc/$PID/status")
echo "     (pid $PID, VmRSS ${rss} kB)"

# --- inventory ----------------------------------------------------------------------------------
t=$(ms); sdr=$(ipmi sdr elist); echo "     (sdr elist took $(( $(ms) - t )) ms)"
for s in 'IPMI Watchdog +\| 00h' 'CPU1 Temp +\| 01h \| ok .*45 degrees C' 'CPU1 VCCIN +\| 02h \| ok .*1.80 Volts' \
         'PS1 Status +\| 03h \| ok .*Presence detected$' 'PS2 Status +\| 04h' 'PS Redundancy +\| 05h .*Fully Redundant' \
         'Pwr Unit Status +\| 06h' 'CPU1 Status +\| 07h .*Presence detected$' 'DIMM A1 +\| 08h' 'OS Status +\| 09h' \
         'BIOS POST +\| 0Ah'; do
  expect "sdr elist: ${s%% +*}" "$s" "$sdr"
done
expect "no SEL record at start (initial states log nothing)" 'SEL has no entries' "$(ipmi sel elist)"
expect "SEL clock reads Pre-Init before Set SEL Time" 'Pre-Init|^S\+ ' "$(ipmi sel time get)"
now=$(printf '%08x' "$(date +%s)")
ipmi raw 0x0a 0x49 "0x${now:6:2}" "0x${now:4:2}" "0x${now:2:2}" "0x${now:0:2}" >/dev/null
expect "Set SEL Time (raw 0x0a 0x49, LE seconds) takes" "$(date -u +%m/%d/%y)" "$(ipmi sel time get)"

# --- chassis_control ----------------------------------------------------------------------------
calls() { cat "$WORK/chassis/calls.log" 2>/dev/null; : > "$WORK/chassis/calls.log"; }
calls >/dev/null
expect "power status asks 'get power'" 'Chassis Power is on' "$(ipmi chassis power status)"
expect "  ... exactly one call" '^[0-9:.]+ get power$' "$(calls)"
expect "power off" 'Down/Off' "$(ipmi chassis power off)"
expect "  ... runs 'set power 0'" '^[0-9:.]+ set power 0$' "$(calls)"
expect "power status follows the program" 'Chassis Power is off' "$(ipmi chassis power status)"
calls >/dev/null
expect "power on" 'Up/On' "$(ipmi chassis power on)"
expect "  ... runs 'set power 1'" '^[0-9:.]+ set power 1$' "$(calls)"
expect "power cycle" 'Cycle' "$(ipmi chassis power cycle)"
sleep 1.5
expect "  ... runs 'set power 0', then 'get power' each second until 0, then 'set power 1'" \
  'set power 0.*get power.*set power 1' "$(calls | tr '\n' ' ')"
expect "power reset runs 'set reset 1'" 'Reset' "$(ipmi chassis power reset)"
expect "  ..." '^[0-9:.]+ set reset 1$' "$(calls)"
expect "power soft runs 'set shutdown 1'" 'Soft' "$(ipmi chassis power soft)"
expect "  ..." '^[0-9:.]+ set shutdown 1$' "$(calls)"
expect "power diag is refused" 'Invalid data field' "$(ipmi chassis power diag)"
expect "bootdev pxe" 'Set Boot Device to pxe' "$(ipmi chassis bootdev pxe)"
expect "  ... runs 'get boot' then 'set boot pxe'" 'get boot .*set boot pxe' "$(calls | tr '\n' ' ')"
expect "identify runs 'set identify <secs> <force>'" 'set identify 5 0' "$(ipmi chassis identify 5 >/dev/null; calls)"
echo fail > "$WORK/chassis/mode"
expect "program exit != 0 on get: Unspecified error" 'Unspecified error' "$(ipmi chassis power status)"
expect "program exit != 0 on set: Unspecified error" 'Unspecified error' "$(ipmi chassis power off)"
echo garbage > "$WORK/chassis/mode"
expect "unparsable get output: Unspecified error" 'Unspecified error' "$(ipmi chassis power status)"
rm -f "$WORK/chassis/mode"; echo 1 > "$WORK/chassis/power"; calls >/dev/null

# --- Get Chassis Status: fixed fields -----------------------------------------------------------
cs=$(ipmi chassis status)
expect "chassis status: power from the program" 'System Power +: on' "$cs"
expect "chassis status: Last Power Event always empty" 'Last Power Event +: $' "$cs"
expect "chassis status: restore policy always-off" 'Power Restore Policy : always-off' "$cs"
expect "chassis status: no fault bits" 'Main Power Fault +: false' "$cs"

# --- faults: console lines and what ipmitool shows ----------------------------------------------
# fault | expected in sdr elist after inject | expected SEL lines after inject | after repair
check_fault() {
  local f=$1 sdr_re=$2 sel_re=$3 rep_re=$4 n err out
  n=$(sel_count)
  mapfile -t lines < <(fault_lines "$f" inject)
  err=$(console "${lines[@]}")
  [ -z "$err" ] || ko "$f: console accepted every line" "$err"
  expect "$f: sdr elist" "$sdr_re" "$(ipmi sdr elist)"
  out=$(sel_since "$n")
  expect "$f: SEL" "$sel_re" "$(printf '%s' "$out" | tr '\n' '~')"
  echo "$out" | sed 's/^/     | /'
  n=$(sel_count)
  mapfile -t lines < <(fault_lines "$f" repair)
  err=$(console "${lines[@]}")
  [ -z "$err" ] || ko "$f repair: console accepted every line" "$err"
  expect "$f repair: SEL" "$rep_re" "$(sel_since "$n" | tr '\n' '~')"
}
check_fault thermal-trip 'CPU1 Temp +\| 01h \| ucr .*100 degrees C' \
  'CPU1 Temp \| Upper Non-critical going high \| Asserted.*CPU1 Temp \| Upper Critical going high \| Asserted \| Reading 100 > Threshold 95.*Processor CPU1 Status \| Thermal Trip \| Asserted' \
  'Upper Critical going high \| Deasserted.*Thermal Trip \| Deasserted'
check_fault psu-failure 'PS1 Status +\| 03h .*Failure detected' \
  'Power Supply PS1 Status \| Failure detected \| Asserted.*PS Redundancy \| Redundancy Lost \| Asserted' \
  'PS1 Status \| Failure detected \| Deasserted.*Fully Redundant \| Asserted'
check_fault psu-failure-all 'PS2 Status +\| 04h .*Failure detected' \
  'PS1 Status \| Failure detected \| Asserted.*PS2 Status \| Failure detected \| Asserted' \
  'PS2 Status \| Failure detected \| Deasserted'
check_fault power-loss 'Pwr Unit Status +\| 06h .*Power off/down' \
  'PS1 Status \| Power Supply AC lost \| Asserted.*PS2 Status \| Power Supply AC lost \| Asserted.*Power Unit Pwr Unit Status \| Power off/down \| Asserted' \
  'Power off/down \| Deasserted'
check_fault vr-fault 'CPU1 VCCIN +\| 02h \| ucr .*2.05 Volts' \
  'Voltage CPU1 VCCIN \| Upper Critical going high \| Asserted \| Reading 2.05 > Threshold 2 Volts.*Power off/down \| Asserted' \
  'CPU1 VCCIN \| Upper Critical going high \| Deasserted'
check_fault cpu-ierr 'CPU1 Status +\| 07h .*IERR' 'Processor CPU1 Status \| IERR \| Asserted' 'IERR \| Deasserted'
check_fault memory-uncorrectable 'DIMM A1 +\| 08h .*Uncorrectable ECC' 'Memory DIMM A1 \| Uncorrectable ECC \| Asserted' \
  'Uncorrectable ECC \| Deasserted'
check_fault kernel-panic 'OS Status +\| 09h .*Run-time critical stop' 'OS Critical Stop OS Status \| Run-time critical stop \| Asserted' '^$'
check_fault post-hang 'BIOS POST +\| 0Ah .*Hang' 'System Firmwares BIOS POST \| Memory initialization \| Asserted' '^$'
check_fault os-hang 'IPMI Watchdog +\| 00h .*Timer expired' 'Watchdog2 IPMI Watchdog \| Timer expired \| Asserted' '^$'
cs=$(ipmi chassis status)
expect "chassis status after all faults: Last Power Event still empty" 'Last Power Event +: $' "$cs"
expect "SEL records carry the set clock (not Pre-Init)" "$(date -u +%m/%d/%y)" "$(ipmi sel elist | tail -1)"

# --- watchdog -----------------------------------------------------------------------------------
expect "Reset Watchdog before any Set: cc 0x80" 'rsp=0x80' "$(ipmi raw 0x06 0x22)"
expect "Set Watchdog, action hard reset, no host connected: cc 0xcc" 'rsp=0xcc' "$(ipmi raw 0x06 0x24 0x04 0x01 0x00 0x10 0x32 0x00)"
wg=$(ipmi raw 0x06 0x25)
expect "Get Watchdog answers 6 data bytes, not 8 (no present countdown)" '^ ([0-9a-f]{2} ){5}[0-9a-f]{2}$' "$wg"
python3 "$HERE/host-stub.py" "$HPORT" 0x13 sleep:45 > "$WORK/host.log" 2>&1 &
HOSTPID=$!
sleep 0.5
resets() { grep -c 'BMC command: RESET' "$WORK/host.log"; }
# action hard reset (1), pre-timeout "messaging interrupt" (0x30) of 2 s, countdown 5.0 s:
calls >/dev/null
expect "Set Watchdog (SMS/OS, hard reset, pre-timeout 2 s, 5.0 s) with host connected" 'rc=0$' \
  "$(ipmi raw 0x06 0x24 0x04 0x31 0x02 0x10 0x32 0x00 >/dev/null; echo rc=$?)"
start=$(ms)
for _ in 1 2 3 4 5 6 7; do ipmi mc watchdog reset >/dev/null; sleep 1.2; done
ipmi mc watchdog reset >/dev/null
last=$(ms)
expect "no expiry while petted over LAN for $(( (last - start) / 1000 )) s (> countdown)" '^0$' "$(resets)"
sleep 4.2
expect "no expiry 4.2 s after the last pet" '^0$' "$(resets)"
sleep 1.8
expect "expiry ~5 s after the last pet: host gets RESET" 'BMC command: RESET' "$(cat "$WORK/host.log")"
expect "expiry: SEL 'Hard reset'" 'Watchdog2 IPMI Watchdog \| Hard reset \| Asserted' "$(ipmi sel elist | tail -2)"
expect "expiry: expiration flag SMS/OS" 'Timer Expiration Flags: \(0x10\)' "$(ipmi mc watchdog get)"
expect "expiry calls no chassis_control" '^$' "$(calls)"
# known bug: a 1 s pre-timeout expires 1 s early (the re-arm of a < 1 s remainder is dropped)
console 'sensor_set_bit 0x20 0 0 1 0 0' >/dev/null
seen=$(resets)
ipmi raw 0x06 0x24 0x04 0x31 0x01 0x10 0x32 0x00 >/dev/null
ipmi mc watchdog reset >/dev/null
sleep 4.5
expect "known ipmi_sim bug: with a 1 s pre-timeout a 5.0 s countdown expires within 4.5 s" "^$((seen + 1))$" "$(resets)"
# known bug: without a pre-timeout, a pet does not restart a running countdown
console 'sensor_set_bit 0x20 0 0 1 0 0' >/dev/null
ipmi raw 0x06 0x24 0x04 0x01 0x00 0x10 0x32 0x00 >/dev/null
seen=$(resets)
ipmi mc watchdog reset >/dev/null
for _ in 1 2 3 4 5; do sleep 1.2; ipmi mc watchdog reset >/dev/null; done
expect "known ipmi_sim bug: without pre-timeout, pets do not restart it (RESET within 6 s despite pets)" \
  "^$((seen + 1))$" "$(resets)"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
