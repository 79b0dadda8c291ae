//! Helpers for tests and benchmarks (feature `test-utils`): device simulators
//! started as child processes on free loopback ports, killed when dropped.
//!
//! The simulators are the repository's `scripts/sims/*.py` run by the test
//! environment's Python (`OUTPOST_PYTHON`, `OUTPOST_SIMS`), so they are real
//! pymodbus and asyncua servers, each owned by one test.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost_sync::test_utils::env_value;

/// A simulator process, killed on drop (also when a test fails).
#[derive(Debug)]
pub struct SimProcess {
    child: Option<Child>,
    /// The port it listens on (loopback).
    pub port: u16,
    script: String,
    program: Option<String>,
    args: Vec<String>,
}

/// Why a simulator did not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The test environment is not up.
    #[error(transparent)]
    Env(#[from] outpost_sync::test_utils::TestEnvError),
    /// The process could not be spawned.
    #[error("spawning {script}: {source}")]
    Spawn {
        /// The script.
        script: String,
        /// Why.
        source: std::io::Error,
    },
    /// It did not listen in time.
    #[error("{script} did not listen on port {port} within 20 s")]
    NotListening {
        /// The script.
        script: String,
        /// The port.
        port: u16,
    },
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl SimProcess {
    /// Starts `scripts/sims/<script>` with `--port <free port>` and `args`,
    /// and waits until it accepts connections.
    pub async fn start(script: &str, args: &[&str]) -> Result<Self, SimError> {
        let mut sim = Self {
            child: None,
            port: free_port(),
            script: script.to_owned(),
            program: None,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        sim.restart().await?;
        Ok(sim)
    }

    /// Starts a mosquitto broker of its own, listening on loopback only.
    pub async fn mosquitto() -> Result<Self, SimError> {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(outpost_sync::test_utils::unique_name("outpost-mosquitto"));
        let conf = dir.join("mosquitto.conf");
        std::fs::create_dir_all(&dir)
            .and_then(|()| {
                std::fs::write(
                    &conf,
                    format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
                )
            })
            .map_err(|source| SimError::Spawn {
                script: "mosquitto".into(),
                source,
            })?;
        let mut sim = Self {
            child: None,
            port,
            script: "mosquitto".into(),
            program: Some("mosquitto".into()),
            args: vec!["-c".into(), conf.to_string_lossy().into_owned()],
        };
        sim.restart().await?;
        Ok(sim)
    }

    /// The loopback address it listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the process (the port stays reserved for [`Self::restart`]).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same port.
    pub async fn restart(&mut self) -> Result<(), SimError> {
        self.kill();
        let mut command = match &self.program {
            Some(program) => Command::new(program),
            None => {
                let mut c = Command::new(env_value("OUTPOST_PYTHON")?);
                let sims = env_value("OUTPOST_SIMS")?;
                c.arg(format!("{sims}/{}", self.script))
                    .arg("--port")
                    .arg(self.port.to_string());
                c
            }
        };
        let child = command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if self.program.is_some() {
                Stdio::null()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .map_err(|source| SimError::Spawn {
                script: self.script.clone(),
                source,
            })?;
        self.child = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(SimError::NotListening {
            script: self.script.clone(),
            port: self.port,
        })
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
