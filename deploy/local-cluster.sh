#!/usr/bin/env bash
# Runs a 3-node NATS cluster on this machine (client ports 4222-4224), data under
# .switchyard/cluster/. Then: SWITCHYARD_STORE__REPLICAS=3 \
#   SWITCHYARD_NATS__SERVERS='["nats://127.0.0.1:4222","nats://127.0.0.1:4223","nats://127.0.0.1:4224"]' \
#   cargo run -- serve
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup >/dev/null
server=.tools/nats-server/bin/nats-server
pids=()
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
for i in 0 1 2; do
  dir=.switchyard/cluster/n$i
  mkdir -p "$dir"
  NAME=n$i PORT=$((4222 + i)) CLUSTER_PORT=$((6222 + i)) MONITOR_PORT=$((8222 + i)) STORE="$PWD/$dir" \
    "$server" -c deploy/nats/cluster-node.conf >"$dir/log" 2>&1 &
  pids+=($!)
done
echo "cluster up: nats://127.0.0.1:4222,4223,4224 (logs in .switchyard/cluster/n*/log); Ctrl-C stops it"
wait
