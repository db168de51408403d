#!/bin/sh
# The client's egress firewall, the same in the compose lab (client
# container) and the netns lab (client namespace). It sits on the client
# itself, so one rule set serves clients with and without a NAT in front.
#
#   firewall.sh open TURN_IP          nothing blocked
#   firewall.sh udp-turn-only TURN_IP UDP only to TURN_IP:3478 (TCP still open,
#                                     for the page and signaling): no direct
#                                     path, TURN over UDP still works
#   firewall.sh tcp443-only TURN_IP   nothing but TCP to port 443: only TURN
#                                     over TLS (and HTTPS/WSS) can get out
#
# Inbound, only replies to what the client sent are let in. Each call
# replaces the rules of the one before.
set -eu

usage() { echo "usage: firewall.sh open|udp-turn-only|tcp443-only TURN_IP" >&2; exit 2; }
[ $# -eq 2 ] || usage
mode=$1 turn_ip=$2

inbound_replies_only() {
  iptables -A INPUT -i lo -j ACCEPT
  iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
  iptables -P INPUT DROP
}

iptables -F INPUT
iptables -F OUTPUT
iptables -P INPUT ACCEPT
iptables -P OUTPUT ACCEPT

case $mode in
  open) ;;
  udp-turn-only)
    iptables -A OUTPUT -o lo -j ACCEPT
    iptables -A OUTPUT -p udp -d "$turn_ip" --dport 3478 -j ACCEPT
    iptables -A OUTPUT -p udp -j DROP
    inbound_replies_only
    ;;
  tcp443-only)
    iptables -A OUTPUT -o lo -j ACCEPT
    iptables -A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    iptables -A OUTPUT -p tcp --dport 443 -j ACCEPT
    iptables -P OUTPUT DROP
    inbound_replies_only
    ;;
  *) usage ;;
esac
