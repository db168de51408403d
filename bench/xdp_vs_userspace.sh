#!/usr/bin/env bash
# CPU per relayed packet: turnkey's XDP fast path (turn.xdp = "native")
# against its user-space path (turn.xdp = "off"), at the same offered load.
#
# The bed: three network namespaces on this machine. `o` (outside) holds
# the clients (10.1.0.2) and their peers (10.2.0.2); `x` routes; `r` runs
# turnkey on 10.3.0.2, its XDP program on r0 (the router's end, xr, has
# bpf/xdp_pass.o: veth delivers XDP_TX only then). Checksum offload is off
# on every veth. turnkey-loadgen --peers runs in `o`: PAIRS allocations,
# each with a channel to its own peer; every allocation and every peer
# sends SIZE-byte datagrams at RATE/s for SECS s (open loop), so each
# packet crosses the relay once (client -> peer, or peer -> client).
#
# Per run we read /proc/stat around the loadgen run (user + nice + system
# + irq + softirq jiffies, the whole machine), loadgen's own CPU
# (/proc/PID/stat), and, with kernel.bpf_stats_enabled=1, the program's
# run_time_ns / run_cnt (from turnkey's BPF descriptors' fdinfo). Reported:
#   gross    whole-machine CPU per relayed packet;
#   net      gross minus the bed's own cost, taken as the XDP run's
#            gross minus the program's own time (so the router, the veths
#            and loadgen, which both runs share, come out; the XDP run's
#            net is then its program time, and the user-space run's is
#            everything it costs beyond the bed);
#   ns/pkt   the program's own time per run (bpf_stats);
#   -loadgen gross minus loadgen's own CPU, per run (a second way to take
#            the bed out: loadgen's system time holds most of the veth and
#            router work, done in its send calls).
# Medians of REPS runs per mode, modes alternating. Needs root.
#
# Usage: bench/xdp_vs_userspace.sh
# Knobs: SIZES="200 1200" PAIRS=10 RATE=1000 SECS=10 REPS=5 SKIP_BUILD=1
# (the default load, 20,000 packets/s, is one the user-space path keeps up
# with on the 2-core bench machine: CPU per packet means something only
# below saturation)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"200 1200"}
PAIRS=${PAIRS:-10}
RATE=${RATE:-1000}
SECS=${SECS:-10}
REPS=${REPS:-5}
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release -q -p turnkey -p turnkey-bench
fi
TURNKEY=$TARGET/release/turnkey
LOADGEN=$TARGET/release/turnkey-loadgen
P=tkb$$
WORK=$(mktemp -d)
cleanup() {
  [ -n "${TK_PID:-}" ] && kill "$TK_PID" 2>/dev/null || true
  for ns in o x r; do ip netns del $P-$ns 2>/dev/null || true; done
  sysctl -qw kernel.bpf_stats_enabled=0 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 130" INT TERM

for ns in o x r; do ip netns add $P-$ns; ip -n $P-$ns link set lo up; done
ip netns exec $P-x sysctl -qw net.ipv4.ip_forward=1
ip link add o0 netns $P-o type veth peer name xo netns $P-x
ip link add r0 netns $P-r type veth peer name xr netns $P-x
ip -n $P-o addr add 10.1.0.2/24 dev o0; ip -n $P-o addr add 10.2.0.2/24 dev o0
ip -n $P-x addr add 10.1.0.1/24 dev xo; ip -n $P-x addr add 10.2.0.1/24 dev xo
ip -n $P-r addr add 10.3.0.2/24 dev r0; ip -n $P-x addr add 10.3.0.1/24 dev xr
for l in "o o0" "x xo" "x xr" "r r0"; do set -- $l
  ip -n $P-$1 link set $2 up; ip netns exec $P-$1 ethtool -K $2 tx off >/dev/null
done
ip -n $P-o route add default via 10.1.0.1
ip -n $P-r route add default via 10.3.0.1
ip -n $P-x link set dev xr xdp obj bpf/xdp_pass.o sec xdp
ip netns exec $P-r sysctl -qw net.ipv4.conf.r0.forwarding=1
sysctl -qw kernel.bpf_stats_enabled=1

busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
HZ=$(getconf CLK_TCK)

# One run: prints "gross_ns_per_pkt loadgen_ns_per_pkt prog_ns_total packets".
run() {
  local mode=$1 size=$2
  cat >"$WORK/tk.toml" <<TOML
[log]
level = "warn"
[http]
listen = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[turn]
listen = ["10.3.0.2:3478"]
tcp_listen = []
threads = 1
relay_port_min = 40000
relay_port_max = 40999
allowed_peer_ranges = ["10.2.0.0/24"]
max_bps = 0
xdp = "$mode"
xdp_interface = "r0"
[auth.users]
bench = "bench-password-123"
TOML
  ip netns exec $P-r "$TURNKEY" --config "$WORK/tk.toml" 2>"$WORK/tk.log" &
  TK_PID=$!
  for _ in $(seq 50); do grep -q "ready: " "$WORK/tk.log" && break; sleep 0.1; done
  # The program's descriptor in turnkey (XDP: prog_type 6).
  local progfd=""
  if [ "$mode" = native ]; then
    for f in /proc/$TK_PID/fdinfo/*; do
      if grep -q "^prog_type:[[:space:]]*6$" "$f" 2>/dev/null; then progfd=$f; break; fi
    done
  fi
  prog() { [ -n "$progfd" ] && awk '/^run_time_ns:/{print $2}' "$progfd" || echo 0; }
  local b0 p0 b1 p1
  b0=$(busy); p0=$(prog)
  ip netns exec $P-o "$LOADGEN" --server 10.3.0.2:3478 --user bench --password bench-password-123 \
    --peers 10.2.0.2 --pairs "$PAIRS" --size "$size" --rate "$RATE" --secs "$SECS" >"$WORK/lg.out" &
  local lg=$!
  local lgcpu=0
  while kill -0 $lg 2>/dev/null; do
    lgcpu=$(awk '{print $14+$15}' /proc/$lg/stat 2>/dev/null || echo "$lgcpu"); sleep 0.2
  done
  wait $lg
  b1=$(busy); p1=$(prog)
  kill -INT "$TK_PID"; wait "$TK_PID" 2>/dev/null || true; TK_PID=""
  local received
  received=$(tr ' ' '\n' <"$WORK/lg.out" | awk -F= '$1=="received"{print $2}')
  echo "$mode $size $(awk -v b=$((b1-b0)) -v l="$lgcpu" -v hz="$HZ" -v n="$received" -v p=$((p1-p0)) \
    'BEGIN{printf "%.0f %.0f %.0f %d", b*1e9/hz/n, l*1e9/hz/n, p/n, n}') $(cat "$WORK/lg.out")" >&2
  awk -v b=$((b1-b0)) -v l="$lgcpu" -v hz="$HZ" -v n="$received" -v p=$((p1-p0)) \
    'BEGIN{printf "%.0f %.0f %.0f %d\n", b*1e9/hz/n, l*1e9/hz/n, p/n, n}'
}

median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }

echo "| size | mode | gross ns/pkt | loadgen ns/pkt | program ns/pkt (bpf_stats) | net ns/pkt | gross - loadgen ns/pkt | packets/run |"
echo "|---|---|---|---|---|---|---|---|"
for size in $SIZES; do
  : >"$WORK/native"; : >"$WORK/off"
  for _ in $(seq "$REPS"); do
    for mode in native off; do run $mode "$size" >>"$WORK/$mode"; done
  done
  g_x=$(cut -d' ' -f1 "$WORK/native" | median); g_u=$(cut -d' ' -f1 "$WORK/off" | median)
  l_x=$(cut -d' ' -f2 "$WORK/native" | median); l_u=$(cut -d' ' -f2 "$WORK/off" | median)
  p_x=$(cut -d' ' -f3 "$WORK/native" | median)
  n_x=$(cut -d' ' -f4 "$WORK/native" | median); n_u=$(cut -d' ' -f4 "$WORK/off" | median)
  d_x=$(awk '{print $1-$2}' "$WORK/native" | median); d_u=$(awk '{print $1-$2}' "$WORK/off" | median)
  bed=$((g_x - p_x))
  echo "| $size | xdp | $g_x | $l_x | $p_x | $p_x | $d_x | $n_x |"
  echo "| $size | user space | $g_u | $l_u | - | $((g_u - bed)) | $d_u | $n_u |"
  awk -v gx=$g_x -v gu=$g_u -v px=$p_x -v bed=$bed -v dx=$d_x -v du=$d_u \
    'BEGIN{printf "| %s | ratio | %.2f | | | %.3f | %.3f | |\n", "'$size'", gx/gu, px/(gu-bed), dx/du}'
done
