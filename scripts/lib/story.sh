# The narrated tour of `scripts/run --story`. Sourced by scripts/run once the
# fleet is up; uses its variables and functions (kubectl, bin, fleet,
# partition, heal_all, start_edge, node_ready, edge_api).

say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
note() { printf '   %s\n' "$*" >&2; }
show() { printf '   $ %s\n' "$*" >&2; "$@" 2>&1 | sed 's/^/     /' >&2 || true; }

device_desired() {
  "$kubectl" get device thermostat -n outpost-demo \
    -o jsonpath="{.spec.properties[?(@.name==\"$1\")].desired.value}"
}
edge_twin() {
  curl -fsS "http://$(edge_api edge-1)/api/v1/devices" |
    jq -r --arg p "$1" '.items[] | select(.name=="thermostat") | .properties[$p] | "\(.reported.value // "-") (desired \(.desired // "-"))"'
}
node_not_ready() { ! node_ready "$1"; }
# Running containers (tasks) of a node, as containerd sees them.
node_tasks_running() {
  local ids running=0
  ids=$(ctr -a "$OUTPOST_CONTAINERD_SOCK" -n k8s.io containers ls -q "labels.\"io.outpost.node\"==$1" 2>/dev/null || true)
  for id in $ids; do
    ctr -a "$OUTPOST_CONTAINERD_SOCK" -n k8s.io tasks ls 2>/dev/null | grep -q "^$id .*RUNNING" && running=$((running + 1))
  done
  echo "$running"
}
edge_pods_running() { (( $(node_tasks_running edge-1) >= 2 )); }
reported_fan_is() {
  [[ $("$kubectl" get devicestatus thermostat -n outpost-demo \
    -o jsonpath='{.status.twins[?(@.propertyName=="fan")].reported.value}' 2>/dev/null) == "$1" ]]
}
fan_is() { [[ $(edge_twin fan) == "$1 "* ]]; }
desired_is() { [[ $(device_desired fan) == "$1" ]]; }

# Kills every container and sandbox of a node, as a power cut would.
power_cut() {
  local ids
  ids=$(ctr -a "$OUTPOST_CONTAINERD_SOCK" -n k8s.io containers ls -q "labels.\"io.outpost.node\"==$1" 2>/dev/null || true)
  for id in $ids; do
    ctr -a "$OUTPOST_CONTAINERD_SOCK" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
  done
}

prom_query() {
  curl -fsS --get "$OUTPOST_PROMETHEUS_URL/api/v1/query" --data-urlencode "query=$1" |
    jq -r '.data.result[] | "\(.metric.node // .metric.role // "fleet")\t\(.value[1])"'
}

run_story() {
  local t0
  say "1. Partition edge-1 from the cloud"
  note "nftables drops edge-1's UDP traffic on loopback. Its pods and its thermostat keep"
  note "working; Kubernetes sees the node go NotReady when its Lease lapses."
  partition edge-1
  t0=$SECONDS
  wait_until "edge-1 NotReady" 120 node_not_ready edge-1
  note "edge-1 is NotReady after $((SECONDS - t0)) s (the truth: the cloud cannot hear it)."
  show "$kubectl" get nodes
  show "$bin/outpost-edge" status --data-dir "$fleet/edge-1"

  say "2. Change the thermostat's fan in Kubernetes, and at the edge over MQTT"
  note "Kubernetes (the cloud's write, which cannot reach edge-1 now):"
  show "$kubectl" patch device thermostat -n outpost-demo --type json \
    -p '[{"op":"add","path":"/spec/properties/1/desired","value":{"value":"4"}}]'
  sleep 2
  note "An edge app on edge-1, a little later, through KubeEdge's MQTT topic:"
  show mosquitto_pub -p "${OUTPOST_MQTT_ADDR##*:}" -t '$hw/events/device/outpost-demo/thermostat/twin/update' \
    -m '{"event_id":"story-1","timestamp":0,"twin":{"fan":{"expected":{"value":"2"}}}}'
  wait_until "the fan at 2 on edge-1" 30 fan_is 2
  note "edge-1 applied its app's value to the device while offline: fan $(edge_twin fan)"

  say "3. Reboot edge-1 while it is still offline"
  note "outpost-edge is killed and every container of the node dies, as in a power cut."
  note "Before: $(node_tasks_running edge-1) containers of edge-1 run (pod sandboxes included)."
  stop_bg outpost-edge-1
  power_cut edge-1
  sleep 1
  note "After the cut: $(node_tasks_running edge-1) run."
  note "Starting outpost-edge again, with no cloud reachable: it rebuilds its pods from its replica."
  t0=$SECONDS
  start_edge edge-1
  wait_until "edge-1's pods back" 120 edge_pods_running
  note "edge-1's containers run again after $((SECONDS - t0)) s, offline: $(node_tasks_running edge-1) running."
  show "$bin/outpost-edge" status --data-dir "$fleet/edge-1"

  say "4. Heal the partition: everything merges"
  heal_all
  t0=$SECONDS
  wait_until "edge-1 Ready again" 120 node_ready edge-1
  note "edge-1 is Ready $((SECONDS - t0)) s after the heal."
  wait_until "the merged desired value in the Device" 60 desired_is 2
  note "The Device now says fan=$(device_desired fan): the edge's write was later, so it wins"
  note "(hybrid logical clock, last writer wins). The cloud's 4 lost, and stays visible:"
  wait_until "the value read offline in the DeviceStatus" 60 reported_fan_is 2
  show "$kubectl" get events -n outpost-demo --field-selector reason=DesiredConflict \
    -o custom-columns=REASON:.reason,MESSAGE:.message
  show "$kubectl" get devicestatus thermostat -n outpost-demo \
    -o jsonpath='{range .status.twins[*]}{.propertyName}: reported={.reported.value} conflicts={.conflicts}{"\n"}{end}'

  say "5. Sync lag, as Prometheus recorded it"
  sleep 6
  note "p50 and p99 of commit-to-persisted lag over the tour, by process (seconds); the"
  note "cloud's p99 includes what edge-1 wrote during the partition, persisted after the heal:"
  prom_query 'histogram_quantile(0.5, sum by (le, role, node) (increase(outpost_sync_lag_seconds_bucket[10m])))' |
    sed 's/^/     p50  /' >&2 || true
  prom_query 'histogram_quantile(0.99, sum by (le, role, node) (increase(outpost_sync_lag_seconds_bucket[10m])))' |
    sed 's/^/     p99  /' >&2 || true
  note "Conflicts resolved: $(prom_query 'sum(outpost_sync_conflicts_resolved_total)' | cut -f2)"
  say "The tour is over; stopping the fleet."
}
