# Small services on loopback: mosquitto, the pymodbus and asyncua device
# simulators, and Prometheus. Sourced by scripts/env.

VENV=$OUTPOST_CACHE/venv

mosquitto_up() {
  need_cmd mosquitto "apt-get install mosquitto"
  local dir=$OUTPOST_ENV_DIR/mosquitto
  mkdir -p "$dir"
  # TCP_NODELAY on the broker: Outpost's clients set it too, and a mismatch
  # costs tens of milliseconds per message (Nagle against delayed ACKs).
  cat > "$dir/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
persistence false
max_queued_messages 10000
log_dest stdout
log_type error
log_type warning
CONF
  is_running mosquitto || { port_free mosquitto "$MQTT_PORT"; start_bg mosquitto mosquitto -c "$dir/mosquitto.conf"; }
  wait_for mosquitto 20 port_open "$MQTT_PORT"
  env_set OUTPOST_MQTT_ADDR "127.0.0.1:$MQTT_PORT"
}

python_env() {
  need_cmd python3
  if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV" || return 1
  fi
  if ! "$VENV/bin/python" -c "import pymodbus, asyncua, sys; \
      sys.exit(0 if (pymodbus.__version__, __import__('importlib.metadata').metadata.version('asyncua')) == ('$PYMODBUS_VERSION', '$ASYNCUA_VERSION') else 1)" 2>/dev/null; then
    "$VENV/bin/pip" install -q --disable-pip-version-check "pymodbus==$PYMODBUS_VERSION" "asyncua==$ASYNCUA_VERSION" \
      >"$OUTPOST_LOGS/pip.log" 2>&1 || { tail -n 20 "$OUTPOST_LOGS/pip.log" >&2; return 1; }
  fi
  env_set OUTPOST_PYTHON "$VENV/bin/python"
  env_set OUTPOST_SIMS "$OUTPOST_ROOT/scripts/sims"
}

sims_up() {
  local py=$VENV/bin/python sims=$OUTPOST_ROOT/scripts/sims
  is_running modbus-device || start_bg modbus-device "$py" "$sims/modbus_device.py" --port "$MODBUS_PORT"
  is_running modbus-rtu-device || start_bg modbus-rtu-device "$py" "$sims/modbus_device.py" --port "$MODBUS_RTU_PORT" --framer rtu
  is_running opcua-device || start_bg opcua-device "$py" "$sims/opcua_device.py" --port "$OPCUA_PORT"
  wait_for modbus-device 30 port_open "$MODBUS_PORT"
  wait_for modbus-rtu-device 30 port_open "$MODBUS_RTU_PORT"
  wait_for opcua-device 60 port_open "$OPCUA_PORT"
  env_set OUTPOST_MODBUS_ADDR "127.0.0.1:$MODBUS_PORT"
  env_set OUTPOST_MODBUS_RTU_ADDR "127.0.0.1:$MODBUS_RTU_PORT"
  env_set OUTPOST_OPCUA_URL "opc.tcp://127.0.0.1:$OPCUA_PORT/outpost/"
}

_prometheus_ready() { curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"; }

prometheus_up() {
  need_cmd prometheus "apt-get install prometheus"
  need_cmd promtool "apt-get install prometheus"
  local dir=$OUTPOST_ENV_DIR/prometheus
  mkdir -p "$dir/data"
  # Scrapes itself until the fleet adds its own targets (file_sd in this folder).
  cat > "$dir/prometheus.yml" <<YAML
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
  - $OUTPOST_ROOT/deploy/prometheus/rules/*.yml
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["127.0.0.1:$PROMETHEUS_PORT"]
  - job_name: outpost
    file_sd_configs:
      - files: ["$dir/targets/*.json"]
YAML
  mkdir -p "$dir/targets"
  is_running prometheus || start_bg prometheus prometheus --config.file "$dir/prometheus.yml" \
    --storage.tsdb.path "$dir/data" --web.listen-address "127.0.0.1:$PROMETHEUS_PORT" \
    --web.enable-lifecycle
  wait_for prometheus 60 _prometheus_ready
  # A running Prometheus re-reads the configuration (and the fleet's rules).
  curl -fsS -X POST "http://127.0.0.1:$PROMETHEUS_PORT/-/reload" >/dev/null || true
  env_set OUTPOST_PROMETHEUS_URL "http://127.0.0.1:$PROMETHEUS_PORT"
  env_set OUTPOST_PROMETHEUS_TARGETS "$dir/targets"
}

services_down() {
  stop_bg prometheus
  stop_bg opcua-device
  stop_bg modbus-rtu-device
  stop_bg modbus-device
  stop_bg mosquitto
}
