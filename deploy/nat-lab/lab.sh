#!/bin/sh
# Entry point of the NAT lab's containers (docker-compose.yml):
#
#   lab.sh router eim|sym LAN_SUBNET
#       NAT and firewall (router.sh), then stay up.
#   lab.sh client ROOM
#       Default route via $GATEWAY (when set), egress firewall $FIREWALL
#       (firewall.sh; default open), then one call in ROOM on turnkey's page
#       at $TURN_IP, printing the client's JSON report (client.mjs).
set -eu
TURN_IP=${TURN_IP:-203.0.113.1}

case ${1:-} in
  router)
    shift
    sh /lab/router.sh "$@"
    echo "router $*: ready"
    # Until the container is stopped (sleep as PID 1 ignores SIGTERM).
    trap 'exit 0' TERM INT
    while :; do sleep 3600 & wait $!; done
    ;;
  client)
    room=${2:?usage: lab.sh client ROOM}
    if [ -n "${GATEWAY:-}" ]; then ip route replace default via "$GATEWAY"; fi
    sh /lab/firewall.sh "${FIREWALL:-open}" "$TURN_IP"
    exec node /lab/client/client.mjs --name "$(hostname)" \
      --url "http://$TURN_IP:8080/?room=$room" \
      --stun "$TURN_IP:3478" --stun "$TURN_IP:3479" \
      --until connected --max-ms 120000 \
      --chromium-arg=--disable-dev-shm-usage
    ;;
  *)
    echo "usage: lab.sh router eim|sym LAN_SUBNET | lab.sh client ROOM" >&2
    exit 2
    ;;
esac
