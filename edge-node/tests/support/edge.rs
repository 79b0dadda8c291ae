//! Helpers of the pod tests: an edge (replica, engine, pod manager) on a
//! temporary data dir with a unique node name, pod specs written into its
//! replica, status polling, clean-up by label, and private containerd
//! instances that a test may crash and "reboot".

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost_edge_node::agent::open_replica;
use outpost_edge_node::cri::CriClient;
use outpost_edge_node::pods::{Backoff, PodManager, PodManagerConfig};
use outpost_sync::access::Roster;
use outpost_sync::document::{DocId, DocKind, Owner};
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::schema::{Container, PodSpecDoc, PodStatusDoc, Schema};
use outpost_sync::test_utils::{env_value, unique_name};

pub fn env(key: &str) -> String {
    env_value(key).expect("test environment: run scripts/env up")
}

pub fn image() -> String {
    env("OUTPOST_IMAGE")
}

/// A pod of one busybox container running `script`.
pub fn pod(name: &str, script: &str) -> PodSpecDoc {
    PodSpecDoc {
        namespace: "default".into(),
        name: name.into(),
        uid: unique_name("uid"),
        containers: vec![Container {
            name: "main".into(),
            image: image(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }],
        termination_grace_period_seconds: Some(1),
        ..Default::default()
    }
}

/// An edge under test: replica, engine and pod manager on a temp data dir.
pub struct Edge {
    pub node: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub engine: Option<Engine>,
    pub manager: Option<PodManager>,
    pub backoff: Backoff,
    /// The peers the edge's engine trusts (the cloud, in tests that have one).
    pub roster: Roster,
    cleanup: Cleanup,
}

/// Removes the node's sandboxes and the data dir when dropped, even when a
/// test fails.
pub struct Cleanup {
    pub socket: PathBuf,
    pub node: String,
    pub dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (socket, node) = (self.socket.clone(), self.node.clone());
        // A runtime of its own: this may run inside the test's runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(cri) = CriClient::connect(&socket).await {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(30),
                        outpost_edge_node::pods::remove_all(&cri, &node),
                    )
                    .await;
                }
            });
        })
        .join();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Edge {
    /// An edge on the test environment's containerd.
    pub async fn start(prefix: &str) -> Self {
        Self::start_on(prefix, PathBuf::from(env("OUTPOST_CONTAINERD_SOCK"))).await
    }

    /// An edge on the runtime at `socket`, with a fast back-off.
    pub async fn start_on(prefix: &str, socket: PathBuf) -> Self {
        let node = unique_name(prefix);
        let dir = std::env::temp_dir().join("outpost-edge-tests").join(&node);
        std::fs::create_dir_all(&dir).unwrap();
        let mut edge = Edge {
            node: node.clone(),
            dir: dir.clone(),
            socket: socket.clone(),
            engine: None,
            manager: None,
            backoff: Backoff {
                base: Duration::from_millis(500),
                max: Duration::from_secs(4),
                reset_after: Duration::from_secs(600),
            },
            roster: Roster::new(),
            cleanup: Cleanup { socket, node, dir },
        };
        edge.start_agent().await;
        edge
    }

    /// Opens the replica and starts the pod manager (again).
    pub async fn start_agent(&mut self) {
        let mut replica = None;
        for _ in 0..50 {
            match open_replica(&self.dir) {
                Ok(r) => {
                    replica = Some(r);
                    break;
                }
                // The previous incarnation's RocksDB lock is released as its
                // last handle drops.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let engine = Engine::new(
            replica.expect("open the replica"),
            self.roster.clone(),
            SyncMetrics::default(),
        );
        self.start_manager(engine);
    }

    pub fn start_manager(&mut self, engine: Engine) {
        let cri = CriClient::connect_lazy(&self.socket);
        self.manager = Some(PodManager::spawn(
            engine.clone(),
            cri,
            PodManagerConfig {
                node: self.node.clone(),
                site: None,
                data_dir: self.dir.clone(),
                pod_log_dir: self.dir.join("pod-logs"),
                pause_image: None,
                node_ip: Some("127.0.0.1".into()),
                sync_interval: Duration::from_millis(300),
                backoff: self.backoff,
            },
        ));
        self.engine = Some(engine);
    }

    /// Stops the agent as a process exit would: tasks gone, replica closed.
    pub async fn stop_agent(&mut self) {
        if let Some(m) = self.manager.take() {
            m.shutdown().await;
        }
        self.engine = None;
    }

    pub fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("agent running")
    }

    pub fn id(&self, kind: DocKind, object: &[&str]) -> DocId {
        DocId::new(kind, Owner::Node(&self.node), object).unwrap()
    }

    pub fn put<T: Schema>(&self, kind: DocKind, object: &[&str], value: &T) {
        self.engine().put(&self.id(kind, object), value).unwrap();
    }

    pub fn put_pod(&self, spec: &PodSpecDoc) {
        self.put(
            DocKind::PodSpec,
            &[&spec.namespace, &spec.name, &spec.uid],
            spec,
        );
    }

    pub fn status(&self, spec: &PodSpecDoc) -> Option<PodStatusDoc> {
        let id = self.id(
            DocKind::PodStatus,
            &[&spec.namespace, &spec.name, &spec.uid],
        );
        self.engine()
            .with_replica(|r| r.get::<PodStatusDoc>(&id))
            .unwrap()
    }

    /// Polls the pod's status until `ok` holds; panics with the last status
    /// after `timeout`.
    pub async fn wait_status(
        &self,
        spec: &PodSpecDoc,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&PodStatusDoc) -> bool,
    ) -> PodStatusDoc {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.status(spec);
            if let Some(s) = &status
                && ok(s)
            {
                return s.clone();
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{what}: not within {timeout:?}; last status: {status:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn cri(&self) -> CriClient {
        CriClient::connect(&self.socket).await.unwrap()
    }
}

/// Whether every container of the status is running and ready.
pub fn all_running(s: &PodStatusDoc) -> bool {
    s.phase == "Running"
        && !s.container_statuses.is_empty()
        && s.container_statuses
            .iter()
            .all(|c| c.state.running.is_some() && c.ready)
}

/// The ids of a container in the status (`containerd://<id>`).
pub fn container_ids(s: &PodStatusDoc) -> Vec<String> {
    s.container_statuses
        .iter()
        .filter_map(|c| c.container_id.clone())
        .collect()
}

// ------------------------------------------------------ private containerd

/// A containerd of the test's own (root, state and socket under a temp
/// dir), sharing the test environment's CNI network and images. Tests that
/// crash or "reboot" the runtime use one, so they never disturb others.
pub struct PrivateContainerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
}

fn ctr(socket: &Path, args: &[&str]) -> String {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["-n", "k8s.io"])
        .args(args)
        .output()
        .expect("run ctr");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test images, exported once per process from the environment's containerd.
fn images_tar() -> PathBuf {
    static TAR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    TAR.get_or_init(|| {
        // Exported under a name of this process, then renamed into place:
        // concurrent test processes never read a half-written file.
        let path = std::env::temp_dir().join("outpost-edge-test-images.tar");
        let tmp = std::env::temp_dir().join(format!(
            "outpost-edge-test-images.{}.tar",
            std::process::id()
        ));
        let shared = PathBuf::from(env("OUTPOST_CONTAINERD_SOCK"));
        let status = Command::new("ctr")
            .arg("--address")
            .arg(&shared)
            .args(["-n", "k8s.io", "images", "export"])
            .arg(&tmp)
            .arg(image())
            .arg(env("OUTPOST_PAUSE_IMAGE"))
            .status()
            .expect("ctr images export");
        assert!(status.success(), "export test images");
        std::fs::rename(&tmp, &path).unwrap();
        path
    })
    .clone()
}

impl PrivateContainerd {
    pub async fn start() -> Self {
        let dir = PathBuf::from("/tmp").join(unique_name("oe-ctrd"));
        std::fs::create_dir_all(&dir).unwrap();
        let shared = std::fs::read_to_string(
            Path::new(&env("OUTPOST_CONTAINERD_SOCK"))
                .parent()
                .unwrap()
                .join("config.toml"),
        )
        .unwrap();
        let socket = dir.join("c.sock");
        let mut config = String::new();
        for line in shared.lines() {
            let t = line.trim_start();
            if t.starts_with("root =") {
                config.push_str(&format!("root = \"{}\"\n", dir.join("root").display()));
            } else if t.starts_with("state =") {
                config.push_str(&format!("state = \"{}\"\n", dir.join("state").display()));
            } else if t.starts_with("address =") {
                config.push_str(&format!("  address = \"{}\"\n", socket.display()));
            } else {
                config.push_str(line);
                config.push('\n');
            }
        }
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let mut me = PrivateContainerd {
            dir,
            socket,
            child: None,
        };
        me.launch().await;
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&me.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(images_tar())
            .output()
            .unwrap();
        assert!(out.status.success(), "import images: {out:?}");
        me
    }

    /// Starts containerd (again) and waits until its CRI answers.
    pub async fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        self.child = Some(child);
        for _ in 0..200 {
            if let Ok(mut cri) = CriClient::connect(&self.socket).await
                && cri
                    .runtime
                    .version(k8s_cri::v1::VersionRequest {
                        version: "v1".into(),
                    })
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "private containerd did not start: see {}",
            self.dir.display()
        );
    }

    /// containerd crashes (SIGKILL); its shims and containers keep running.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The machine "reboots": every container dies, then containerd and
    /// its shims, and the runtime's state dir (a tmpfs in real life) is
    /// wiped. The root (images, sandbox and container records) survives.
    pub async fn power_off(&mut self) {
        let tasks = ctr(&self.socket, &["tasks", "ls", "-q"]);
        for task in tasks.lines().filter(|l| !l.is_empty()) {
            ctr(
                &self.socket,
                &["tasks", "kill", "-a", "-s", "SIGKILL", task],
            );
        }
        // Let containerd see the exits (and unmount the rootfs).
        for _ in 0..50 {
            let listing = ctr(&self.socket, &["tasks", "ls"]);
            if !listing.contains("RUNNING") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.crash();
        self.kill_shims();
        self.unmount_all();
        let _ = std::fs::remove_dir_all(self.dir.join("state"));
    }

    /// Shims of this instance, found by their `-address` argument.
    fn kill_shims(&self) {
        let needle = format!("-address\0{}", self.socket.display());
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in procs.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("containerd-shim") && cmdline.contains(&needle) {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
    }

    /// Lazily unmounts whatever is still mounted under this instance's dir.
    fn unmount_all(&self) {
        let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let prefix = self.dir.to_string_lossy().into_owned();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").args(["-l", p]).status();
        }
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        // Remove every pod through CRI first, so that CNI releases the
        // addresses in the shared pool.
        let socket = self.socket.clone();
        if self.child.is_some() {
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(cri) = CriClient::connect(&socket).await {
                        let mut runtime = cri.runtime.clone();
                        if let Ok(list) = runtime
                            .list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest { filter: None })
                            .await
                        {
                            for sb in list.into_inner().items {
                                let _ = runtime
                                    .stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest {
                                        pod_sandbox_id: sb.id.clone(),
                                    })
                                    .await;
                                let _ = runtime
                                    .remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest {
                                        pod_sandbox_id: sb.id,
                                    })
                                    .await;
                            }
                        }
                    }
                });
            })
            .join();
        }
        self.crash();
        self.kill_shims();
        self.unmount_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
