# Sourced by the signaling benchmarks (signaling_backends.sh,
# signaling_vs_matchbox.sh): a turnkey config for a signaling load from
# one address, so every per-address and per-socket budget is raised and
# only signaling is measured. Prints the file.
#
# signaling_config BACKEND HTTP_PORT [REDIS_URL]
signaling_config() {
  cat <<CFG
[http]
listen = "127.0.0.1:$2"
max_connections_per_ip = 100000
max_connections = 100000
[metrics]
listen = "127.0.0.1:0"
[turn]
listen = ["127.0.0.1:0"]
tcp_listen = []
[access]
mints_per_minute = 0
[signaling]
backend = "$1"
${3:+redis_url = \"$3\"}
max_sockets_per_ip = 100000
joins_per_sec_per_ip = 0
messages_per_sec = 0
bytes_per_sec = 0
max_rooms = 1000000
CFG
}
