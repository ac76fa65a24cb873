#!/usr/bin/env bash
# Runs a 3-node NATS cluster on this machine (client ports 4222-4224), data under
# .switchyard/cluster/, with the accounts of deploy/nats/accounts.conf. Passwords are taken
# from the environment, or default to "dev-<user>". Then:
#   SWITCHYARD_NATS__SERVERS='["nats://127.0.0.1:4222","nats://127.0.0.1:4223","nats://127.0.0.1:4224"]' \
#   SWITCHYARD_NATS__PASSWORD=dev-switchyard SWITCHYARD_HTTP__LISTEN=127.0.0.1:8080 \
#   cargo run -- serve --config deploy/switchyard.toml
# and call it as the operator: switchyard call counter.list -s nats://operator:dev-operator@127.0.0.1:4222
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup >/dev/null
export SWITCHYARD_PASSWORD="${SWITCHYARD_PASSWORD:-dev-switchyard}" AUDITOR_PASSWORD="${AUDITOR_PASSWORD:-dev-auditor}" \
  OPERATOR_PASSWORD="${OPERATOR_PASSWORD:-dev-operator}" PORTAL_PASSWORD="${PORTAL_PASSWORD:-dev-portal}" \
  POD_PASSWORD="${POD_PASSWORD:-dev-pod}" MACHINE_PASSWORD="${MACHINE_PASSWORD:-dev-machine}"
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
