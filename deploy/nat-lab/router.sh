#!/bin/sh
# A home router's NAT and stateful firewall, the same in the compose lab
# (run in a router container) and the netns lab (run in a router namespace).
#
#   router.sh eim LAN_SUBNET   endpoint-independent mapping: Linux MASQUERADE
#                              keeps a LAN socket's source port for every
#                              destination, so the srflx address a STUN server
#                              reports is the one every peer sees.
#   router.sh sym LAN_SUBNET   symmetric: --random-fully draws a new random
#                              port for every destination, so the srflx port is
#                              useless to anyone but the STUN server itself.
#
# Both filter like real NATs: only replies to what the LAN sent come in
# (address- and port-dependent filtering), and unsolicited packets to the
# router are dropped silently rather than answered with ICMP. The caller
# turns on IP forwarding (sysctl in the namespace / compose `sysctls:`).
set -eu

usage() { echo "usage: router.sh eim|sym LAN_SUBNET" >&2; exit 2; }
[ $# -eq 2 ] || usage
mode=$1 lan=$2
case $mode in
  eim) random="" ;;
  sym) random="--random-fully" ;;
  *) usage ;;
esac

# shellcheck disable=SC2086  # $random is empty or one word
iptables -t nat -A POSTROUTING -s "$lan" ! -d "$lan" -j MASQUERADE $random
iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
iptables -A FORWARD -s "$lan" -j ACCEPT
iptables -P FORWARD DROP
iptables -A INPUT -i lo -j ACCEPT
iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
iptables -A INPUT -s "$lan" -j ACCEPT
iptables -P INPUT DROP
