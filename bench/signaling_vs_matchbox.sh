#!/usr/bin/env bash
# Signaling, turnkey (memory backend) beside matchbox_server, under the
# same open-loop load from `turnkey-sigload` (bench/sigload.rs): PEERS
# peers in rooms of two, RATE signals/s of SIZE bytes for SECS seconds.
# Each server is started fresh for each run, the order alternates between
# rounds, and every run reports:
#   sent / received / lost, latency p50 / p99 / p999 (ms);
#   server CPU ticks (utime + stime from /proc/PID/stat) per 10,000
#     received messages, over the send phase: from the first signal until
#     the last one arrived (or 2 s after the last send); connects excluded;
#   RSS per idle peer: VmRSS with every peer connected, joined and idle
#     for IDLE_MS, minus VmRSS of the fresh process, divided by PEERS.
# Runs go to $WORK/runs.tsv (or OUT=path); the table is the median of
# each column per server.
#
# Usage: bench/signaling_vs_matchbox.sh
# Knobs: PEERS=8000 RATE=2000 SECS=10 SIZE=200 REPS=3 IDLE_MS=1000
#        SERVERS="turnkey matchbox" SKIP_BUILD=1 OUT=path
#        TURNKEY=PATH SIGLOAD=PATH (default: this tree's release builds)
#        MATCHBOX=PATH (default: matchbox_server on PATH; install it with
#          cargo install matchbox_server --version '^0.15' --root DIR)
# Sends traffic only to 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-8000}
RATE=${RATE:-2000}
SECS=${SECS:-10}
SIZE=${SIZE:-200}
REPS=${REPS:-3}
IDLE_MS=${IDLE_MS:-1000}
SERVERS=${SERVERS:-turnkey matchbox}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
TURNKEY=${TURNKEY:-$TARGET/release/turnkey}
SIGLOAD=${SIGLOAD:-$TARGET/release/turnkey-sigload}
case " $SERVERS " in
  *" matchbox "*)
    MATCHBOX=${MATCHBOX:-$(command -v matchbox_server || true)}
    if [ -z "$MATCHBOX" ] || [ ! -x "$MATCHBOX" ]; then
      echo "matchbox_server not found: set MATCHBOX=path or install it with" >&2
      echo "  cargo install matchbox_server --version '^0.15' --root DIR" >&2
      echo "(or SERVERS=turnkey to run turnkey's half only)" >&2
      exit 1
    fi ;;
esac
if [ -z "${SKIP_BUILD:-}" ]; then
  (cd "$ROOT" && cargo build --release --quiet --workspace --bin turnkey --bin turnkey-sigload)
fi
# 8,000 sockets on each side of one machine.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

WORK=$(mktemp -d /tmp/turnkey-sigvs.XXXXXX)
OUT=${OUT:-$WORK/runs.tsv}
PORT=${PORT:-18390}
PID=""
cleanup() { [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true; }
trap cleanup EXIT

# turnkey with its budgets raised, since every peer comes from one address.
# shellcheck source=bench/signaling_config.sh
. "$ROOT/bench/signaling_config.sh"
config() { signaling_config memory "$PORT"; }

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "server did not listen on $PORT" >&2
  return 1
}

start() { # server
  case "$1" in
    turnkey)
      config >"$WORK/turnkey.toml"
      "$TURNKEY" --config "$WORK/turnkey.toml" >"$WORK/turnkey.log" 2>&1 &
      PID=$!
      URL="ws://127.0.0.1:$PORT/ws"; PROTO=turnkey ;;
    matchbox)
      "$MATCHBOX" "127.0.0.1:$PORT" >"$WORK/matchbox.log" 2>&1 &
      PID=$!
      URL="ws://127.0.0.1:$PORT"; PROTO=matchbox ;;
    *) echo "unknown server $1" >&2; exit 1 ;;
  esac
  wait_port
  # Let the fresh process settle before its empty RSS is read.
  sleep 0.3
}

printf 'server\tround\tload\tsent\treceived\tlost\tp50_ms\tp99_ms\tp999_ms\tticks\tticks_per_10k\trss_per_peer_kib\n' >"$OUT"
for round in $(seq "$REPS"); do
  order=$SERVERS
  if [ $((round % 2)) = 0 ]; then order=$(echo "$SERVERS" | tr ' ' '\n' | tac | tr '\n' ' '); fi
  for s in $order; do
    start "$s"
    load=$(cut -d' ' -f1 /proc/loadavg)
    out=$("$SIGLOAD" --protocol "$PROTO" --url "$URL" --server-pid "$PID" \
      --peers "$PEERS" --rate "$RATE" --secs "$SECS" --size "$SIZE" --idle-ms "$IDLE_MS")
    kill -9 "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
    echo "$out" >>"$WORK/$s.json"
    echo "$out" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
s, rnd, load = sys.argv[1:4]
f = lambda v, d=2: "-" if v is None else ("%.*f" % (d, v))
print("\t".join(str(c) for c in [s, rnd, load, r["sent"], r["received"], r["lost"],
    f(r["p50_ms"], 3), f(r["p99_ms"], 3), f(r["p999_ms"], 3), r["server_cpu_ticks"],
    f(r["ticks_per_10k"], 1), f(r["rss_per_peer_kib"], 1)]))
' "$s" "$round" "$load" >>"$OUT"
    tail -1 "$OUT" >&2
  done
done

python3 - "$OUT" "$SERVERS" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
cols = ["sent", "received", "lost", "p50_ms", "p99_ms", "p999_ms", "ticks_per_10k", "rss_per_peer_kib"]
def med(vals):
    vals = [float(v) for v in vals if v not in ("-", "None")]
    return statistics.median(vals) if vals else float("nan")
print("| server | runs | load avg | " + " | ".join(cols) + " |")
print("| --- " * (len(cols) + 3) + "|")
meds = {}
for s in sys.argv[2].split():
    rs = [r for r in rows if r["server"] == s]
    if not rs:
        continue
    m = {c: med(r[c] for r in rs) for c in cols}
    meds[s] = m
    loads = "/".join(r["load"] for r in rs)
    print("| %s | %d | %s | " % (s, len(rs), loads) + " | ".join(
        ("%d" % m[c]) if c in ("sent", "received", "lost") else ("%.3f" % m[c] if c.endswith("ms") else "%.1f" % m[c])
        for c in cols) + " |")
if "turnkey" in meds and "matchbox" in meds:
    t, mb = meds["turnkey"], meds["matchbox"]
    print()
    print("turnkey / matchbox: " + ", ".join(
        "%s %.2f" % (c, t[c] / mb[c]) for c in ["p50_ms", "p99_ms", "p999_ms", "ticks_per_10k", "rss_per_peer_kib"] if mb[c]))
PY
echo "runs: $OUT" >&2
