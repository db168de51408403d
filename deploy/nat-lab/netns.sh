#!/usr/bin/env bash
# The NAT lab of docker-compose.yml (beside this file) built with network
# namespaces instead of containers: for CI (tests/nat_lab.rs) and for anyone
# with root and no Docker engine. Same networks, same addresses, and the
# same router.sh / firewall.sh rules as the compose file; tests/deploy.rs
# checks that the two agree.
#
#   netns.sh describe
#       Print the topology: one line per network and per node.
#   netns.sh up PREFIX [--upstream] [--hold SECS]
#       Build the lab as namespaces named PREFIX-*. With --hold, stay in
#       the foreground until standard input closes, SECS pass (at most
#       3600) or a signal comes, then tear everything down: a caller that
#       dies, even by SIGKILL, closes our stdin and so still cleans up.
#       --upstream gives the turnkey namespace a default route, as a VPS
#       has, to a namespace where every packet vanishes (counted).
#   netns.sh down PREFIX
#       Kill every process inside the lab's namespaces, delete them (their
#       veths and bridges go with them). Safe to repeat.
#   netns.sh gc
#       Tear down labs named tkl<PID>n<N> whose process PID is gone.
#   netns.sh firewall PREFIX NODE open|udp-turn-only|tcp443-only
#   netns.sh exec PREFIX NODE CMD...
#   netns.sh counter PREFIX upstream
#       Packets that vanished upstream (with --upstream).
#
# Every address exists only inside namespaces this script created: veth
# pairs are created directly inside them, nothing is added to the caller's
# namespace, and routers have no route out of the lab.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)

# The topology. A network is a bridge in a namespace of its own (a switch);
# a node is a namespace with one veth per network it sits on, named after
# that network. `nat=` runs router.sh in the node, `gw=` sets its default
# route. Documentation (203.0.113.0/24) and private ranges only.
topology() {
  cat <<'EOF'
net  public        203.0.113.0/24
net  lan-eim-a     10.11.0.0/24
net  lan-eim-b     10.12.0.0/24
net  lan-sym-a     10.21.0.0/24
net  lan-sym-b     10.22.0.0/24
node turnkey       public=203.0.113.1
node router-eim-a  public=203.0.113.11  lan-eim-a=10.11.0.1  nat=eim
node router-eim-b  public=203.0.113.12  lan-eim-b=10.12.0.1  nat=eim
node router-sym-a  public=203.0.113.21  lan-sym-a=10.21.0.1  nat=sym
node router-sym-b  public=203.0.113.22  lan-sym-b=10.22.0.1  nat=sym
node client-open-a public=203.0.113.101
node client-open-b public=203.0.113.102
node client-eim-a  lan-eim-a=10.11.0.100  gw=10.11.0.1
node client-eim-b  lan-eim-b=10.12.0.100  gw=10.12.0.1
node client-sym-a  lan-sym-a=10.21.0.100  gw=10.21.0.1
node client-sym-b  lan-sym-b=10.22.0.100  gw=10.22.0.1
EOF
}

TURN_IP=203.0.113.1
# The --upstream link: turnkey's side, the vanishing side.
UPSTREAM_NET=198.51.100.0/30
UPSTREAM_OWN=198.51.100.1
UPSTREAM_PEER=198.51.100.2
MAX_HOLD=3600

die() { echo "netns.sh: $*" >&2; exit 2; }

check_prefix() {
  [[ $1 =~ ^[a-z][a-z0-9]{0,15}$ ]] || die "PREFIX must be 1-16 of [a-z0-9], starting with a letter: '$1'"
}

net_ns() { echo "$1-net-$2"; }

subnet_of() {
  topology | awk -v n="$1" '$1 == "net" && $2 == n { print $3 }'
}

lab_namespaces() {
  ip netns list | awk '{ print $1 }' | grep -E "^$1-" || true
}

down() {
  local prefix=$1 ns pids all=() i
  mapfile -t nss < <(lab_namespaces "$prefix")
  [ ${#nss[@]} -gt 0 ] || return 0
  for ns in "${nss[@]}"; do
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null || true)
    all+=("${pids[@]}")
  done
  if [ ${#all[@]} -gt 0 ]; then
    kill -TERM "${all[@]}" 2>/dev/null || true
    for i in $(seq 30); do
      kill -0 "${all[@]}" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "${all[@]}" 2>/dev/null || true
  fi
  for ns in "${nss[@]}"; do
    ip netns del "$ns" 2>/dev/null || true
  done
}

up() {
  local prefix=$1 upstream=$2 kind name rest ns net addr len key val sub
  # Switches first, so nodes can plug into them.
  while read -r kind name rest; do
    [ "$kind" = net ] || continue
    ns=$(net_ns "$prefix" "$name")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add br0 type bridge
    ip -n "$ns" link set br0 up
  done < <(topology)

  while read -r kind name rest; do
    [ "$kind" = node ] || continue
    ns="$prefix-$name"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    for kv in $rest; do
      key=${kv%%=*} val=${kv#*=}
      case $key in
        nat | gw) ;;
        *)
          sub=$(subnet_of "$key")
          [ -n "$sub" ] || die "node $name: unknown network $key"
          len=${sub#*/}
          net=$(net_ns "$prefix" "$key")
          ip link add "$key" netns "$ns" type veth peer name "$name" netns "$net"
          ip -n "$net" link set "$name" master br0 up
          ip -n "$ns" addr add "$val/$len" dev "$key"
          ip -n "$ns" link set "$key" up
          ;;
      esac
    done
    # Routing and NAT once every interface is up.
    for kv in $rest; do
      key=${kv%%=*} val=${kv#*=}
      case $key in
        gw) ip -n "$ns" route add default via "$val" ;;
        nat)
          lan=$(lan_of "$rest")
          ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
          ip netns exec "$ns" sh "$here/router.sh" "$val" "$(subnet_of "$lan")"
          ;;
      esac
    done
  done < <(topology)

  if [ "$upstream" = 1 ]; then
    ns="$prefix-upstream"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add upstream netns "$prefix-turnkey" type veth peer name turnkey netns "$ns"
    ip -n "$prefix-turnkey" addr add "$UPSTREAM_OWN/${UPSTREAM_NET#*/}" dev upstream
    ip -n "$prefix-turnkey" link set upstream up
    ip -n "$ns" addr add "$UPSTREAM_PEER/${UPSTREAM_NET#*/}" dev turnkey
    ip -n "$ns" link set turnkey up
    ip -n "$prefix-turnkey" route add default via "$UPSTREAM_PEER"
    # The provider's network: it forwards nothing back into the lab and
    # drops (and counts) every packet not addressed to itself.
    ip netns exec "$ns" iptables -t raw -A PREROUTING ! -d "$UPSTREAM_PEER" -j DROP
  fi
}

# The network of a router's node line that is not `public`.
lan_of() {
  local kv
  for kv in $1; do
    case ${kv%%=*} in public | nat | gw) ;; *) echo "${kv%%=*}"; return ;; esac
  done
}

cmd=${1:-}
case $cmd in
  describe)
    topology | awk '{ $1 = $1; print }'
    ;;
  up)
    [ $# -ge 2 ] || die "usage: netns.sh up PREFIX [--upstream] [--hold SECS]"
    prefix=$2; shift 2
    check_prefix "$prefix"
    upstream=0 hold=""
    while [ $# -gt 0 ]; do
      case $1 in
        --upstream) upstream=1; shift ;;
        --hold) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--hold needs seconds"; hold=$2; shift 2 ;;
        *) die "unknown option $1" ;;
      esac
    done
    [ "$(id -u)" -eq 0 ] || die "needs root (ip netns)"
    [ -z "$(lab_namespaces "$prefix")" ] || die "a lab named $prefix exists; run: netns.sh down $prefix"
    built=0 waiter=""
    # Whatever happens while building, and after it with --hold, nothing
    # is left behind.
    cleanup() {
      [ -n "$waiter" ] && kill "$waiter" 2>/dev/null
      if [ -n "$hold" ] || [ "$built" = 0 ]; then down "$prefix"; fi
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM HUP
    up "$prefix" "$upstream"
    built=1
    echo "ready $prefix"
    if [ -n "$hold" ]; then
      [ "$hold" -le $MAX_HOLD ] || hold=$MAX_HOLD
      # In the background so that a signal interrupts `wait` at once;
      # stdin is passed explicitly (background jobs get /dev/null).
      exec 3<&0
      timeout "$hold" cat <&3 >/dev/null &
      waiter=$!
      wait "$waiter" || true
      waiter=""
    fi
    ;;
  down)
    [ $# -eq 2 ] || die "usage: netns.sh down PREFIX"
    check_prefix "$2"
    down "$2"
    ;;
  gc)
    for ns in $(ip netns list | awk '{ print $1 }'); do
      if [[ $ns =~ ^(tkl([0-9]+)n[0-9]+)- ]] && ! kill -0 "${BASH_REMATCH[2]}" 2>/dev/null; then
        down "${BASH_REMATCH[1]}"
      fi
    done
    ;;
  firewall)
    [ $# -eq 4 ] || die "usage: netns.sh firewall PREFIX NODE MODE"
    check_prefix "$2"
    ip netns exec "$2-$3" sh "$here/firewall.sh" "$4" "$TURN_IP"
    ;;
  exec)
    [ $# -ge 4 ] || die "usage: netns.sh exec PREFIX NODE CMD..."
    check_prefix "$2"
    ns="$2-$3"; shift 3
    exec ip netns exec "$ns" "$@"
    ;;
  counter)
    [ $# -eq 3 ] && [ "$3" = upstream ] || die "usage: netns.sh counter PREFIX upstream"
    check_prefix "$2"
    ip netns exec "$2-upstream" iptables -t raw -L PREROUTING -v -x -n | awk '$3 == "DROP" { print $1; exit }'
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
