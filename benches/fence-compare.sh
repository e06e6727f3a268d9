#!/usr/bin/env bash
# fence-compare.sh: how long vigil takes to fence a node, next to the real fence agents
# (fence_redfish and fence_ipmilan, Debian package fence-agents) fencing the same lab BMC, over
# both paths: Redfish (the lab's BMC) and IPMI (the lab's real ipmi_sim).
#
#   benches/fence-compare.sh [N] [SERVER...]      defaults: N=10, servers db1 backup1
#
# It starts its own lab (vigil-lab up) in a scratch folder, and for each run, each server and each
# tool: powers the node on and waits until its OS runs, then times the fence from start to exit 0,
# and checks through the lab's control API that the node really is Off. The tools run round-robin
# so that any drift of the machine touches all of them alike. At the end it prints per server and
# tool the median, min and max, and the ratio of each agent to vigil on the same path.
#
# Tools (TOOLS=..., space-separated, default all six):
#   vigil              vigil fence --config LAB/vigil.toml --method redfish NODE
#   fence_redfish      fence_redfish with its defaults (polls power state every 1 s)
#   fence_redfish_fast fence_redfish --stonith-status-sleep=0 --power-timeout=400 (polls back to back)
#   vigil_ipmi         vigil fence --config LAB/vigil.toml --method ipmi NODE
#   fence_ipmilan      fence_ipmilan --lanplus --cipher 3 with its defaults
#   fence_ipmilan_fast fence_ipmilan ... --stonith-status-sleep=0 --power-timeout=400
#
# Environment: VIGIL, VIGIL_LAB (binaries; default target/debug), TOPOLOGY, TOOLS, SETTLE (seconds
# to wait after the OS runs before fencing, default 0.5), KEEP=1 keeps the scratch folder.
#
# It ends only the lab it started (by its PID), and never another process.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${1:-${N:-10}}
shift || true
SERVERS=("$@")
[ ${#SERVERS[@]} -eq 0 ] && SERVERS=(db1 backup1)
VIGIL=${VIGIL:-$ROOT/target/debug/vigil}
VIGIL_LAB=${VIGIL_LAB:-$ROOT/target/debug/vigil-lab}
TOPOLOGY=${TOPOLOGY:-$ROOT/hardware-lab/topologies/rack4.toml}
read -r -a TOOLS <<<"${TOOLS:-vigil fence_redfish fence_redfish_fast vigil_ipmi fence_ipmilan fence_ipmilan_fast}"
SETTLE=${SETTLE:-0.5}

die() { echo "fence-compare: $*" >&2; exit 1; }

case "$N" in '' | *[!0-9]* | 0) die "N must be a positive integer, not '$N'" ;; esac
for b in "$VIGIL" "$VIGIL_LAB"; do [ -x "$b" ] || die "$b is missing: build it first (cargo build)"; done
for c in curl jq python3; do command -v "$c" >/dev/null || die "$c is needed (apt-get install -y $c)"; done
for t in "${TOOLS[@]}"; do
  case "$t" in
    vigil | vigil_ipmi) ;;
    fence_redfish | fence_redfish_fast | fence_ipmilan | fence_ipmilan_fast)
      command -v "${t%_fast}" >/dev/null ||
        die "${t%_fast} is missing: apt-get install -y --no-install-recommends fence-agents" ;;
    *) die "unknown tool '$t' (vigil, fence_redfish, fence_redfish_fast, vigil_ipmi, fence_ipmilan, fence_ipmilan_fast)" ;;
  esac
done
[ -n "${EPOCHREALTIME:-}" ] || die "bash 5 is needed (EPOCHREALTIME)"

WORK=$(mktemp -d /tmp/fence-compare.XXXXXX)
LAB="$WORK/lab"
LAB_PID=

cleanup() {
  if [ -n "$LAB_PID" ] && kill -0 "$LAB_PID" 2>/dev/null; then
    kill -TERM "$LAB_PID" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$LAB_PID" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$LAB_PID" 2>/dev/null; then
      echo "fence-compare: the lab (pid $LAB_PID) ignored SIGTERM for 10 s; sending SIGKILL" >&2
      kill -KILL "$LAB_PID" 2>/dev/null
    fi
    wait "$LAB_PID" 2>/dev/null
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "fence-compare: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the lab -------------------------------------------------------------------------------------

"$VIGIL_LAB" up --topology "$TOPOLOGY" --state-dir "$LAB" >"$WORK/lab.log" 2>&1 &
LAB_PID=$!

for _ in $(seq 1 300); do
  jq -e .servers "$LAB/endpoints.json" >/dev/null 2>&1 && break
  kill -0 "$LAB_PID" 2>/dev/null || { cat "$WORK/lab.log" >&2; die "the lab exited"; }
  sleep 0.1
done
jq -e .servers "$LAB/endpoints.json" >/dev/null 2>&1 || die "no $LAB/endpoints.json after 30 s"
CA=$(jq -r .ca_file "$LAB/endpoints.json")

status() { "$VIGIL_LAB" status --state-dir "$LAB" "$1" 2>/dev/null; }
# "PowerState BootProgress os", e.g. "On OSRunning running"
state() { status "$1" | jq -r '"\(.power_state) \(.boot_progress) \(.os)"' 2>/dev/null; }

declare -A PORT USER PWFILE SYSURI IPORT
for s in "${SERVERS[@]}"; do
  url=$(jq -r --arg s "$s" '.servers[$s].redfish_url // empty' "$LAB/endpoints.json")
  [ -n "$url" ] || die "no server '$s' in the lab"
  PORT[$s]=${url##*:}
  IPORT[$s]=$(jq -r --arg s "$s" '.servers[$s].ipmi_port // empty' "$LAB/endpoints.json")
  USER[$s]=$(jq -r --arg s "$s" '.servers[$s].username' "$LAB/endpoints.json")
  PWFILE[$s]=$(jq -r --arg s "$s" '.servers[$s].password_file' "$LAB/endpoints.json")
  # The system's URI, explicitly: fence_redfish's own discovery takes the *last* member of
  # /redfish/v1/Systems, which is the wrong system on a multi-system BMC (openbmc's failover1).
  SYSURI[$s]=$(curl -sS --cacert "$CA" -u "${USER[$s]}:$(cat "${PWFILE[$s]}")" \
    "$url/redfish/v1/Systems" | jq -r '.Members[0]["@odata.id"]')
  [ -n "${SYSURI[$s]}" ] && [ "${SYSURI[$s]}" != null ] || die "cannot read $s's Systems collection"
done

# Power a server on (Redfish On) and wait until its OS runs. iDRAC refuses an On sent too soon
# after a ForceOff (409 for a short window): the loop just sends it again.
power_on_and_wait() {
  local s=$1 st last=0 now
  for _ in $(seq 1 600); do
    st=$(state "$s")
    case "$st" in
      "On OSRunning running") sleep "$SETTLE"; return 0 ;;
      Off\ *)
        now=${EPOCHREALTIME/./}
        if ((now - last > 250000)); then
          last=$now
          curl -sS -o /dev/null --cacert "$CA" -u "${USER[$s]}:$(cat "${PWFILE[$s]}")" \
            -X POST -H 'Content-Type: application/json' -d '{"ResetType":"On"}' \
            "https://127.0.0.1:${PORT[$s]}${SYSURI[$s]}/Actions/ComputerSystem.Reset" || true
        fi ;;
    esac
    sleep 0.1
  done
  die "$s did not come back to OSRunning within 60 s (last: $st)"
}

fence_cmd() {
  local tool=$1 s=$2
  case "$tool" in
    vigil) echo "$VIGIL" fence --config "$LAB/vigil.toml" --method redfish "$s" ;;
    vigil_ipmi) echo "$VIGIL" fence --config "$LAB/vigil.toml" --method ipmi "$s" ;;
    fence_ipmilan | fence_ipmilan_fast)
      printf '%s ' fence_ipmilan --ip 127.0.0.1 --ipport "${IPORT[$s]}" --lanplus --cipher 3 \
        --username "${USER[$s]}" --password-script "'cat ${PWFILE[$s]}'" --action=off
      [ "$tool" = fence_ipmilan_fast ] && printf '%s ' --stonith-status-sleep=0 --power-timeout=400
      echo ;;
    fence_redfish | fence_redfish_fast)
      # fence_redfish has no CA-file option: --ssl verifies against the system store unless
      # python-requests is pointed at the lab CA (REQUESTS_CA_BUNDLE, set when it runs).
      printf '%s ' REQUESTS_CA_BUNDLE="$CA" fence_redfish --ip 127.0.0.1 --ipport "${PORT[$s]}" --ssl \
        --username "${USER[$s]}" --password-script "'cat ${PWFILE[$s]}'" \
        --systems-uri="${SYSURI[$s]}" --action=off
      [ "$tool" = fence_redfish_fast ] && printf '%s ' --stonith-status-sleep=0 --power-timeout=400
      echo ;;
  esac
}

run_fence() {
  local tool=$1 s=$2
  case "$tool" in
    vigil) "$VIGIL" fence --config "$LAB/vigil.toml" --method redfish "$s" ;;
    vigil_ipmi) "$VIGIL" fence --config "$LAB/vigil.toml" --method ipmi "$s" ;;
    fence_ipmilan | fence_ipmilan_fast)
      local extra=()
      [ "$tool" = fence_ipmilan_fast ] && extra=(--stonith-status-sleep=0 --power-timeout=400)
      fence_ipmilan --ip 127.0.0.1 --ipport "${IPORT[$s]}" --lanplus --cipher 3 \
        --username "${USER[$s]}" --password-script "cat ${PWFILE[$s]}" --action=off "${extra[@]}" ;;
    fence_redfish | fence_redfish_fast)
      local extra=()
      [ "$tool" = fence_redfish_fast ] && extra=(--stonith-status-sleep=0 --power-timeout=400)
      REQUESTS_CA_BUNDLE="$CA" fence_redfish --ip 127.0.0.1 --ipport "${PORT[$s]}" --ssl \
        --username "${USER[$s]}" --password-script "cat ${PWFILE[$s]}" \
        --systems-uri="${SYSURI[$s]}" --action=off "${extra[@]}" ;;
  esac
}

echo "fence-compare: lab pid $LAB_PID in $LAB; N=$N; servers: ${SERVERS[*]}; tools: ${TOOLS[*]}"
echo "fence-compare: fence_redfish $(fence_redfish --version 2>/dev/null || echo '?') ($(dpkg-query -W -f='${Version}' fence-agents 2>/dev/null || echo 'not from dpkg'))"
for s in "${SERVERS[@]}"; do
  for t in "${TOOLS[@]}"; do echo "  $s $t: $(fence_cmd "$t" "$s")"; done
done

SAMPLES="$WORK/samples.tsv" # server tool run ms rc confirmed_off
: >"$SAMPLES"
for i in $(seq 1 "$N"); do
  for s in "${SERVERS[@]}"; do
    for t in "${TOOLS[@]}"; do
      power_on_and_wait "$s"
      t0=${EPOCHREALTIME/./}
      run_fence "$t" "$s" >"$WORK/last.log" 2>&1
      rc=$?
      t1=${EPOCHREALTIME/./}
      p=$(status "$s" | jq -r .power_state)
      ms=$(((t1 - t0) / 1000))
      printf '%s\t%s\t%d\t%d\t%d\t%s\n' "$s" "$t" "$i" "$ms" "$rc" "$p" >>"$SAMPLES"
      printf 'run %2d %-8s %-18s %6d ms  rc=%d  lab says %s\n' "$i" "$s" "$t" "$ms" "$rc" "$p"
      if [ "$rc" != 0 ] || [ "$p" != Off ]; then sed 's/^/    | /' "$WORK/last.log" | tail -n 5; fi
    done
  done
done
for s in "${SERVERS[@]}"; do power_on_and_wait "$s"; done

python3 - "$SAMPLES" "${TOOLS[@]}" <<'EOF'
import sys, statistics, collections
path, tools = sys.argv[1], sys.argv[2:]
ok, bad = collections.defaultdict(list), collections.Counter()
servers = []
for line in open(path):
    s, t, _, ms, rc, p = line.rstrip("\n").split("\t")
    if s not in servers:
        servers.append(s)
    if rc == "0" and p == "Off":
        ok[s, t].append(int(ms))
    else:
        bad[s, t] += 1
print()
print(f"{'server':<9} {'tool':<19} {'n':>3} {'failed':>6} {'median':>8} {'min':>7} {'max':>7}  vs vigil on the same path")
for s in servers:
    for t in tools:
        ref = "vigil_ipmi" if "ipmi" in t else "vigil"
        base = statistics.median(ok[s, ref]) if ok[s, ref] else None
        v = ok[s, t]
        if not v:
            print(f"{s:<9} {t:<19} {0:>3} {bad[s, t]:>6}   (no successful run)")
            continue
        med = statistics.median(v)
        ratio = f"x{med / base:.2f}" if base else "-"
        print(f"{s:<9} {t:<19} {len(v):>3} {bad[s, t]:>6} {med:>6.0f}ms {min(v):>5}ms {max(v):>5}ms  {ratio}")
if any(bad.values()):
    print("\nsome fences failed or left the node on (see the runs above)")
    sys.exit(1)
EOF
