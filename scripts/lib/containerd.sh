# containerd and runc with the CRI plugin, a bridge CNI network, and a local
# busybox image that also serves as the sandbox (pause) image, since no
# container registry is reachable. Sourced by scripts/env.

CTRD_DIR=$OUTPOST_ENV_DIR/containerd
CTRD_SOCK=$CTRD_DIR/containerd.sock
# Fully qualified names: the CRI plugin qualifies short names with docker.io
# and would try to pull them.
OUTPOST_IMAGE=docker.io/outpost/busybox:1
OUTPOST_PAUSE_IMAGE=docker.io/outpost/pause:1

containerd_config() {
  mkdir -p "$CTRD_DIR/net.d" "$CTRD_DIR/pod-logs"
  cat > "$CTRD_DIR/config.toml" <<TOML
version = 2
root = "$CTRD_DIR/root"
state = "$CTRD_DIR/state"

[grpc]
  address = "$CTRD_SOCK"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$OUTPOST_PAUSE_IMAGE"
  # The VM refuses to lower oom_score_adj; without this every sandbox fails.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$CTRD_DIR/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
TOML
  cat > "$CTRD_DIR/net.d/10-outpost.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "outpost-test",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "outpost0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.77.0/24"}]],
        "dataDir": "$CTRD_DIR/cni-ipam"
      }
    },
    {"type": "loopback"}
  ]
}
JSON
}

_ctrd_ready() { ctr --address "$CTRD_SOCK" version; }

containerd_up() {
  need_cmd containerd "apt-get install containerd"
  need_cmd runc "apt-get install runc"
  [[ -x /usr/lib/cni/bridge ]] || die "CNI plugins missing (apt-get install containernetworking-plugins)"
  containerd_config
  if ! is_running containerd; then
    start_bg containerd containerd --config "$CTRD_DIR/config.toml"
  fi
  wait_for containerd 60 _ctrd_ready
  containerd_image
  env_set OUTPOST_CONTAINERD_SOCK "$CTRD_SOCK"
  env_set OUTPOST_IMAGE "$OUTPOST_IMAGE"
  env_set OUTPOST_PAUSE_IMAGE "$OUTPOST_PAUSE_IMAGE"
  env_set OUTPOST_POD_LOG_DIR "$CTRD_DIR/pod-logs"
}

# containerd_image: builds an OCI layout holding two images that share one
# layer (a busybox-static root filesystem): the busybox image for test
# containers and a pause image whose entrypoint sleeps until it is signalled.
containerd_image() {
  local c=(ctr --address "$CTRD_SOCK" -n k8s.io)
  # Listed into a variable first: `ctr | grep -q` fails under pipefail when
  # grep stops reading early.
  local present
  present=$("${c[@]}" images ls -q) || return 1
  if grep -qx "$OUTPOST_PAUSE_IMAGE" <<<"$present" && grep -qx "$OUTPOST_IMAGE" <<<"$present"; then
    return 0
  fi
  [[ -x /bin/busybox ]] || die "busybox missing (apt-get install busybox-static)"
  local work; work=$(mktemp -d)
  mkdir -p "$work/rootfs/bin" "$work/rootfs/tmp" "$work/rootfs/etc" "$work/rootfs/proc" \
    "$work/rootfs/sys" "$work/rootfs/dev" "$work/layout/blobs/sha256"
  cp /bin/busybox "$work/rootfs/bin/busybox"
  local applet
  for applet in $(/bin/busybox --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$work/rootfs/bin/$applet"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' > "$work/rootfs/etc/passwd"
  echo 'root:x:0:' > "$work/rootfs/etc/group"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/rootfs" -cf "$work/layer.tar" .
  local blobs=$work/layout/blobs/sha256
  local layer_sha; layer_sha=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  local layer_size; layer_size=$(stat -c %s "$work/layer.tar")
  mv "$work/layer.tar" "$blobs/$layer_sha"

  _blob() { # writes stdin as a blob, prints "sha size"
    local tmp=$work/blob.tmp; cat > "$tmp"
    local sha; sha=$(sha256sum "$tmp" | cut -d' ' -f1)
    local size; size=$(stat -c %s "$tmp")
    mv "$tmp" "$blobs/$sha"; echo "$sha $size"
  }
  _manifest() { # name entrypoint-json cmd-json -> prints a descriptor for index.json
    local name=$1 entry=$2 cmd=$3 cfg man
    cfg=$(printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Entrypoint":%s,"Cmd":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
      "$entry" "$cmd" "$layer_sha" | _blob)
    man=$(printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
      ${cfg% *} ${cfg#* } "$layer_sha" "$layer_size" | _blob)
    printf '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"1"}}' \
      ${man% *} ${man#* } "$name"
  }
  local busybox_desc pause_desc
  busybox_desc=$(_manifest "$OUTPOST_IMAGE" 'null' '["sh"]')
  pause_desc=$(_manifest "$OUTPOST_PAUSE_IMAGE" \
    '["/bin/sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]' 'null')
  printf '{"imageLayoutVersion":"1.0.0"}' > "$work/layout/oci-layout"
  printf '{"schemaVersion":2,"manifests":[%s,%s]}' "$busybox_desc" "$pause_desc" > "$work/layout/index.json"
  tar -C "$work/layout" -cf "$work/images.tar" .
  "${c[@]}" images import --all-platforms "$work/images.tar" >"$OUTPOST_LOGS/image-import.log" 2>&1 \
    || { cat "$OUTPOST_LOGS/image-import.log" >&2; rm -rf "$work"; return 1; }
  rm -rf "$work"
  present=$("${c[@]}" images ls -q) || return 1
  grep -qx "$OUTPOST_PAUSE_IMAGE" <<<"$present" || die "pause image missing after import"
}

containerd_down() {
  if is_running containerd && [[ -S $CTRD_SOCK ]]; then
    # Remove the CRI pods first so that their shims and network namespaces go too.
    local c=(ctr --address "$CTRD_SOCK" -n k8s.io)
    local t
    for t in $("${c[@]}" tasks ls -q 2>/dev/null); do "${c[@]}" tasks kill -s KILL "$t" >/dev/null 2>&1 || true; done
  fi
  stop_bg containerd
  pkill -f "containerd-shim-runc-v2 .*-address $CTRD_SOCK" 2>/dev/null || true
}
