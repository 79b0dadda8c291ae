# The Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kubectl, built from pinned Go modules and started on
# loopback with generated certificates. Sourced by scripts/env.

K8S_DIR=$OUTPOST_ENV_DIR/kubernetes
K8S_PKI=$K8S_DIR/pki

# The Go modules in scripts/go pin every module; a stamp of their go.sum
# decides whether the cached binaries are current.
_go_stamp() { cat "$OUTPOST_ROOT/scripts/go/$1/go.mod" "$OUTPOST_ROOT/scripts/go/$1/go.sum" | sha256sum | cut -c1-16; }

k8s_build() {
  need_cmd go "Go 1.26 or newer"
  mkdir -p "$OUTPOST_BIN" "$OUTPOST_LOGS"
  local stamp; stamp=$(_go_stamp kubernetes)
  if [[ -x $OUTPOST_BIN/kube-apiserver && "$(cat "$OUTPOST_BIN/.kubernetes.stamp" 2>/dev/null)" == "$stamp" ]]; then
    log "kubernetes $KUBERNETES_VERSION binaries are current"
  else
    log "building kube-apiserver, kube-controller-manager, kube-scheduler and kubectl $KUBERNETES_VERSION (cold: ~15 min on 2 cores; log: $OUTPOST_LOGS/build-kubernetes.log)"
    local v=k8s.io/component-base/version
    (cd "$OUTPOST_ROOT/scripts/go/kubernetes" && GOBIN=$OUTPOST_BIN GOFLAGS=-mod=readonly go install -trimpath \
      -ldflags "-s -w -X $v.gitVersion=$KUBERNETES_VERSION -X $v.gitMajor=1 -X $v.gitMinor=37 -X $v.gitTreeState=clean" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl) \
      >"$OUTPOST_LOGS/build-kubernetes.log" 2>&1 || { tail -n 30 "$OUTPOST_LOGS/build-kubernetes.log" >&2; return 1; }
    echo "$stamp" > "$OUTPOST_BIN/.kubernetes.stamp"
  fi
  stamp=$(_go_stamp etcd)
  if [[ -x $OUTPOST_BIN/etcd && "$(cat "$OUTPOST_BIN/.etcd.stamp" 2>/dev/null)" == "$stamp" ]]; then
    log "etcd $ETCD_VERSION binary is current"
  else
    log "building etcd $ETCD_VERSION (log: $OUTPOST_LOGS/build-etcd.log)"
    (cd "$OUTPOST_ROOT/scripts/go/etcd" && GOFLAGS=-mod=readonly go build -trimpath -ldflags "-s -w" \
      -o "$OUTPOST_BIN/etcd" go.etcd.io/etcd/server/v3) \
      >"$OUTPOST_LOGS/build-etcd.log" 2>&1 || { tail -n 30 "$OUTPOST_LOGS/build-etcd.log" >&2; return 1; }
    echo "$stamp" > "$OUTPOST_BIN/.etcd.stamp"
  fi
}

_cert() { # name subject [san]: a key and a certificate signed by the test CA
  local name=$1 subj=$2 san=${3:-}
  [[ -f $K8S_PKI/$name.crt ]] && return 0
  openssl genrsa -out "$K8S_PKI/$name.key" 2048 2>/dev/null
  openssl req -new -key "$K8S_PKI/$name.key" -subj "$subj" -out "$K8S_PKI/$name.csr" 2>/dev/null
  local ext=$K8S_PKI/$name.ext
  if [[ -n $san ]]; then
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' > "$ext"
  fi
  openssl x509 -req -in "$K8S_PKI/$name.csr" -CA "$K8S_PKI/ca.crt" -CAkey "$K8S_PKI/ca.key" \
    -CAcreateserial -days 3650 -extfile "$ext" -out "$K8S_PKI/$name.crt" 2>/dev/null
}

_kubeconfig() { # file cert-name user
  local file=$1 cert=$2 user=$3
  [[ -f $file ]] && return 0
  local k=(kubectl --kubeconfig "$file")
  "${k[@]}" config set-cluster outpost-test --server "https://127.0.0.1:$APISERVER_PORT" \
    --certificate-authority "$K8S_PKI/ca.crt" --embed-certs=true >/dev/null
  "${k[@]}" config set-credentials "$user" --client-certificate "$K8S_PKI/$cert.crt" \
    --client-key "$K8S_PKI/$cert.key" --embed-certs=true >/dev/null
  "${k[@]}" config set-context default --cluster outpost-test --user "$user" >/dev/null
  "${k[@]}" config use-context default >/dev/null
}

k8s_pki() {
  need_cmd openssl
  mkdir -p "$K8S_PKI"
  if [[ ! -f $K8S_PKI/ca.crt ]]; then
    openssl genrsa -out "$K8S_PKI/ca.key" 2048 2>/dev/null
    openssl req -x509 -new -key "$K8S_PKI/ca.key" -subj "/CN=outpost-test-ca" -days 3650 \
      -out "$K8S_PKI/ca.crt" 2>/dev/null
  fi
  _cert apiserver "/CN=kube-apiserver" \
    "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  _cert admin "/O=system:masters/CN=outpost-admin"
  _cert controller-manager "/CN=system:kube-controller-manager"
  _cert scheduler "/CN=system:kube-scheduler"
  [[ -f $K8S_PKI/sa.key ]] || { openssl genrsa -out "$K8S_PKI/sa.key" 2048 2>/dev/null
    openssl rsa -in "$K8S_PKI/sa.key" -pubout -out "$K8S_PKI/sa.pub" 2>/dev/null; }
  _kubeconfig "$K8S_DIR/admin.kubeconfig" admin outpost-admin
  _kubeconfig "$K8S_DIR/controller-manager.kubeconfig" controller-manager system:kube-controller-manager
  _kubeconfig "$K8S_DIR/scheduler.kubeconfig" scheduler system:kube-scheduler
}

_apiserver_ready() {
  curl -fsS --cacert "$K8S_PKI/ca.crt" --cert "$K8S_PKI/admin.crt" --key "$K8S_PKI/admin.key" \
    "https://127.0.0.1:$APISERVER_PORT/readyz"
}
_etcd_ready() { curl -fsS "http://127.0.0.1:$ETCD_CLIENT_PORT/health"; }
_https_ready() { curl -fsSk "https://127.0.0.1:$1/healthz"; }

k8s_up() {
  k8s_pki
  if ! is_running etcd; then
    port_free etcd "$ETCD_CLIENT_PORT"
    start_bg etcd etcd --name outpost-test --data-dir "$K8S_DIR/etcd" \
      --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
      --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
      --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-cluster "outpost-test=http://127.0.0.1:$ETCD_PEER_PORT" \
      --unsafe-no-fsync --quota-backend-bytes 4294967296
  fi
  wait_for etcd 60 _etcd_ready
  if ! is_running kube-apiserver; then
    port_free kube-apiserver "$APISERVER_PORT"
    start_bg kube-apiserver kube-apiserver \
      --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
      --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
      --endpoint-reconciler-type none \
      --service-cluster-ip-range 10.96.0.0/16 \
      --client-ca-file "$K8S_PKI/ca.crt" \
      --tls-cert-file "$K8S_PKI/apiserver.crt" --tls-private-key-file "$K8S_PKI/apiserver.key" \
      --service-account-key-file "$K8S_PKI/sa.pub" \
      --service-account-signing-key-file "$K8S_PKI/sa.key" \
      --service-account-issuer https://kubernetes.default.svc \
      --authorization-mode Node,RBAC --allow-privileged=true \
      --profiling=false
  fi
  wait_for kube-apiserver 120 _apiserver_ready
  if ! is_running kube-controller-manager; then
    start_bg kube-controller-manager kube-controller-manager \
      --kubeconfig "$K8S_DIR/controller-manager.kubeconfig" \
      --authentication-kubeconfig "$K8S_DIR/controller-manager.kubeconfig" \
      --authorization-kubeconfig "$K8S_DIR/controller-manager.kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "$CONTROLLER_MANAGER_PORT" \
      --service-account-private-key-file "$K8S_PKI/sa.key" --root-ca-file "$K8S_PKI/ca.crt" \
      --use-service-account-credentials --leader-elect=false \
      --cluster-signing-cert-file "$K8S_PKI/ca.crt" --cluster-signing-key-file "$K8S_PKI/ca.key" \
      --node-monitor-grace-period=10s --node-monitor-period=2s \
      --profiling=false
  fi
  if ! is_running kube-scheduler; then
    start_bg kube-scheduler kube-scheduler \
      --kubeconfig "$K8S_DIR/scheduler.kubeconfig" \
      --authentication-kubeconfig "$K8S_DIR/scheduler.kubeconfig" \
      --authorization-kubeconfig "$K8S_DIR/scheduler.kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" --leader-elect=false \
      --profiling=false
  fi
  wait_for kube-controller-manager 60 _https_ready "$CONTROLLER_MANAGER_PORT"
  wait_for kube-scheduler 60 _https_ready "$SCHEDULER_PORT"
  env_set KUBECONFIG "$K8S_DIR/admin.kubeconfig"
  env_set OUTPOST_APISERVER "https://127.0.0.1:$APISERVER_PORT"
}

k8s_down() {
  stop_bg kube-scheduler
  stop_bg kube-controller-manager
  stop_bg kube-apiserver
  stop_bg etcd
}
