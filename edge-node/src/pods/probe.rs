//! Startup, liveness and readiness probes of running containers.
//!
//! One worker task per running container that has probes. It runs each probe
//! on its own period and keeps the results where the status writer reads
//! them. A container whose startup or liveness probe fails
//! `failureThreshold` times in a row is stopped by the worker; the pod
//! manager then restarts it under the pod's restart policy, as kubelet does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_cri::v1 as cri;
use outpost_sync::schema::{ContainerPort, PortRef, Probe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::cri::CriClient;

/// What a container's probes say now.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProbeResults {
    /// The startup probe passed (or there is none).
    pub started: bool,
    /// The readiness probe passes (or there is none).
    pub ready: bool,
    /// Why the worker stopped the container, if it did.
    pub killed: Option<String>,
}

/// Where and what to probe.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub container_id: String,
    pub container_name: String,
    /// The pod's IP (127.0.0.1 for host-network pods).
    pub host: String,
    pub ports: Vec<ContainerPort>,
    /// Seconds the container gets to stop when a probe kills it.
    pub grace_s: i64,
}

/// The probes of one container.
#[derive(Debug, Clone, Default)]
pub(crate) struct Probes {
    pub startup: Option<Probe>,
    pub liveness: Option<Probe>,
    pub readiness: Option<Probe>,
}

impl Probes {
    pub fn any(&self) -> bool {
        self.startup.is_some() || self.liveness.is_some() || self.readiness.is_some()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Startup,
    Liveness,
    Readiness,
}

struct Schedule {
    kind: Kind,
    probe: Probe,
    next: Instant,
    successes: i32,
    failures: i32,
}

fn secs(v: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(v.unwrap_or(default).max(0) as u64)
}

/// The initial results for a container with these probes.
pub(crate) fn initial(probes: &Probes) -> ProbeResults {
    ProbeResults {
        started: probes.startup.is_none(),
        ready: probes.readiness.is_none() && probes.startup.is_none(),
        killed: None,
    }
}

/// Runs the probes of one container until it stops or a probe kills it.
pub(crate) async fn run(
    cri: CriClient,
    target: Target,
    probes: Probes,
    results: Arc<Mutex<ProbeResults>>,
    wake: Arc<Notify>,
) {
    let start = Instant::now();
    let has_readiness = probes.readiness.is_some();
    let mut schedule: Vec<Schedule> = [
        (Kind::Startup, probes.startup),
        (Kind::Liveness, probes.liveness),
        (Kind::Readiness, probes.readiness),
    ]
    .into_iter()
    .filter_map(|(kind, probe)| {
        probe.map(|probe| Schedule {
            kind,
            next: start + secs(probe.initial_delay_seconds, 0),
            probe,
            successes: 0,
            failures: 0,
        })
    })
    .collect();
    loop {
        let started = results.lock().map(|r| r.started).unwrap_or(true);
        // Liveness and readiness wait for the startup probe.
        let Some(next) = schedule
            .iter_mut()
            .filter(|s| (s.kind == Kind::Startup) != started)
            .min_by_key(|s| s.next)
        else {
            return;
        };
        tokio::time::sleep_until(next.next).await;
        let period = secs(next.probe.period_seconds, 10).max(Duration::from_millis(100));
        next.next = Instant::now() + period;
        let outcome = probe_once(&cri, &target, &next.probe).await;
        match outcome {
            Ok(()) => {
                next.failures = 0;
                next.successes += 1;
            }
            Err(ref reason) => {
                debug!(container = %target.container_name, kind = ?next.kind, %reason, "probe failed");
                next.successes = 0;
                next.failures += 1;
            }
        }
        let success_threshold = next.probe.success_threshold.unwrap_or(1).max(1);
        let failure_threshold = next.probe.failure_threshold.unwrap_or(3).max(1);
        let mut changed = false;
        let mut kill = None;
        if let Ok(mut r) = results.lock() {
            match next.kind {
                Kind::Startup => {
                    if next.successes >= 1 && !r.started {
                        r.started = true;
                        if !has_readiness {
                            r.ready = true;
                        }
                        changed = true;
                    } else if next.failures >= failure_threshold {
                        kill = outcome
                            .as_ref()
                            .err()
                            .map(|e| format!("Startup probe failed: {e}"));
                    }
                }
                Kind::Liveness => {
                    if next.failures >= failure_threshold {
                        kill = outcome
                            .as_ref()
                            .err()
                            .map(|e| format!("Liveness probe failed: {e}"));
                    }
                }
                Kind::Readiness => {
                    if next.successes >= success_threshold && !r.ready {
                        r.ready = true;
                        changed = true;
                    } else if next.failures >= failure_threshold && r.ready {
                        r.ready = false;
                        changed = true;
                    }
                }
            }
            if let Some(why) = &kill {
                r.killed = Some(why.clone());
                r.ready = false;
            }
        }
        if let Some(why) = kill {
            info!(container = %target.container_name, id = %target.container_id, reason = %why, "stopping the container: it will be restarted");
            let mut runtime = cri.runtime.clone();
            let _ = runtime
                .stop_container(cri::StopContainerRequest {
                    container_id: target.container_id.clone(),
                    timeout: target.grace_s,
                })
                .await;
            wake.notify_one();
            return;
        }
        if changed {
            wake.notify_one();
        }
    }
}

fn port_of(port: &PortRef, ports: &[ContainerPort]) -> Result<u16, String> {
    let n = match port {
        PortRef::Number(n) => *n,
        PortRef::Name(name) => match name.parse::<i32>() {
            Ok(n) => n,
            Err(_) => ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
                .ok_or_else(|| format!("no container port named {name:?}"))?,
        },
    };
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("invalid port {n}"))
}

/// Runs one probe: `Ok` on success, the reason otherwise.
pub(crate) async fn probe_once(
    cri: &CriClient,
    target: &Target,
    probe: &Probe,
) -> Result<(), String> {
    let timeout = secs(probe.timeout_seconds, 1).max(Duration::from_millis(100));
    if let Some(exec) = &probe.exec {
        let mut runtime = cri.runtime.clone();
        let call = runtime.exec_sync(cri::ExecSyncRequest {
            container_id: target.container_id.clone(),
            cmd: exec.command.clone(),
            timeout: timeout.as_secs().max(1) as i64,
        });
        let reply = tokio::time::timeout(timeout + Duration::from_secs(1), call)
            .await
            .map_err(|_| format!("command timed out after {timeout:?}"))?
            .map_err(|e| e.message().to_owned())?
            .into_inner();
        return if reply.exit_code == 0 {
            Ok(())
        } else {
            let out = String::from_utf8_lossy(if reply.stderr.is_empty() {
                &reply.stdout
            } else {
                &reply.stderr
            })
            .trim()
            .chars()
            .take(200)
            .collect::<String>();
            Err(format!("command exited with {}: {out}", reply.exit_code))
        };
    }
    if let Some(http) = &probe.http_get {
        let port = port_of(&http.port, &target.ports)?;
        let host = http.host.clone().unwrap_or_else(|| target.host.clone());
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        // HTTPS probes: kubelet does not verify certificates; without a TLS
        // stack here, an HTTPS probe checks that the port accepts connections.
        let https = http.scheme.as_deref() == Some("HTTPS");
        return tokio::time::timeout(timeout, async {
            let mut stream = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| format!("dial {host}:{port}: {e}"))?;
            if https {
                return Ok(());
            }
            let request = format!(
                "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: outpost-probe/1.0\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
            let mut head = Vec::with_capacity(64);
            let mut buf = [0u8; 256];
            while !head.contains(&b'\n') && head.len() < 1024 {
                let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let line = String::from_utf8_lossy(&head);
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("not an HTTP response: {:?}", line.lines().next().unwrap_or_default()))?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        })
        .await
        .map_err(|_| format!("HTTP probe timed out after {timeout:?}"))?;
    }
    if let Some(tcp) = &probe.tcp_socket {
        let port = port_of(&tcp.port, &target.ports)?;
        let host = tcp.host.clone().unwrap_or_else(|| target.host.clone());
        return tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| format!("dial {host}:{port}: timed out"))?
        .map(|_| ())
        .map_err(|e| format!("dial {host}:{port}: {e}"));
    }
    Err("the probe has no handler (exec, httpGet or tcpSocket)".into())
}
