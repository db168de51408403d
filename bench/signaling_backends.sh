#!/usr/bin/env bash
# Signaling load with the memory backend beside the Redis backend, in one
# run: `turnkey-sigload` (open-loop, bench/sigload.rs) against
#   memory       one node, signaling.backend = "memory"
#   redis        one node, signaling.backend = "redis" (rooms in Redis)
#   redis-2node  two nodes on one Redis, every room split across them
# Reports connect time for all peers, delivered/lost signals, latency
# percentiles, and the turnkey processes' CPU time and peak RSS.
#
# Usage: bench/signaling_backends.sh
# Knobs: PEERS=1000 RATE=1000 SECS=10 SIZE=200 SKIP_BUILD=1
#        TURNKEY=PATH SIGLOAD=PATH (default: this tree's release builds)
# Needs: cargo, redis-server. Sends traffic only to 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-1000}
RATE=${RATE:-1000}
SECS=${SECS:-10}
SIZE=${SIZE:-200}
TURNKEY=${TURNKEY:-$ROOT/target/release/turnkey}
SIGLOAD=${SIGLOAD:-$ROOT/target/release/turnkey-sigload}
TICKS=$(getconf CLK_TCK)
if [ -z "${SKIP_BUILD:-}" ]; then
  (cd "$ROOT" && cargo build --release --quiet --workspace --bin turnkey --bin turnkey-sigload)
fi
command -v redis-server >/dev/null || { echo "redis-server is required" >&2; exit 1; }

WORK=$(mktemp -d /tmp/turnkey-sigbench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

REDIS_PORT=$((20000 + RANDOM % 10000))
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$WORK" >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break || sleep 0.1
done

# A node's config: budgets raised, since every peer comes from one address.
# shellcheck source=bench/signaling_config.sh
. "$ROOT/bench/signaling_config.sh"
config() { # backend http_port
  signaling_config "$1" "$2" "redis://127.0.0.1:$REDIS_PORT/"
}

start_node() { # name backend port
  config "$2" "$3" >"$WORK/$1.toml"
  "$TURNKEY" --config "$WORK/$1.toml" >"$WORK/$1.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 100); do
    grep -q "ready: " "$WORK/$1.log" && break || sleep 0.1
  done
  echo "$pid"
}

cpu_s() { awk -v t="$TICKS" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$1/stat"; }
rss_mib() { awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

printf '| backend | peers | connect (s) | sent | received | lost | p50 ms | p99 ms | p999 ms | turnkey CPU (s) | peak RSS (MiB) |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n'
run() { # label backend nodes
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  local a b="" args cpu rss
  a=$(start_node "$1-a" "$2" 18290)
  args=(--url "ws://127.0.0.1:18290/ws")
  if [ "$3" = 2 ]; then
    b=$(start_node "$1-b" "$2" 18291)
    args+=(--url2 "ws://127.0.0.1:18291/ws")
  fi
  local out
  out=$("$SIGLOAD" "${args[@]}" --peers "$PEERS" --rate "$RATE" --secs "$SECS" --size "$SIZE")
  echo "$out" >"$WORK/$1.json"
  cpu=$(cpu_s "$a"); rss=$(rss_mib "$a")
  if [ -n "$b" ]; then
    cpu=$(awk -v x="$cpu" -v y="$(cpu_s "$b")" 'BEGIN { printf "%.2f", x + y }')
    rss="$rss + $(rss_mib "$b")"
  fi
  kill -9 "$a" ${b:+"$b"} 2>/dev/null || true
  echo "$out" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
label, cpu, rss = sys.argv[1:4]
cells = [label, r["peers"], "%.2f" % r["connect_secs"], r["sent"], r["received"], r["lost"],
         "%.2f" % r["p50_ms"], "%.2f" % r["p99_ms"], "%.2f" % r["p999_ms"], cpu, rss]
print("| " + " | ".join(str(c) for c in cells) + " |")
' "$1" "$cpu" "$rss"
}

run memory memory 1
run redis redis 1
run redis-2node redis 2
echo "logs: $WORK" >&2
