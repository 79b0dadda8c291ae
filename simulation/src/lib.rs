//! Outpost's network-chaos simulation harness: the deterministic mode, the
//! real-stack mode and the real-process mode.
//!
//! This crate is how Outpost shows that replicas converge and lose no
//! acknowledged write whatever the network does. It runs a whole fleet in
//! one process: cloud replicas and edges grouped into sites, each a real
//! [`outpost_sync::replica::Replica`] on an in-memory RocksDB disk, talking
//! the real sans-IO [`outpost_sync::protocol::Session`] over a simulated
//! network in simulated time. Every random choice (delays, faults, workload
//! values) comes from one seed, so a seed replays its history bit for bit;
//! a digest of the history proves it.
//!
//! It owns:
//! - [`scenario`]: the TOML scenario format (fleet, network, workload,
//!   checker bounds, a timeline of faults) and its validation;
//! - [`nemesis`]: random fault timelines drawn from the seed;
//! - [`world`]: the event loop: nodes, connections, sessions, faults,
//!   crashes, membership changes, the workload, and the checkers
//!   (convergence, no acknowledged write lost, the desired-value conflict
//!   rule, bounded storage, liveness); the private `checks` module holds
//!   the checker rules it shares with the real-stack mode;
//! - [`report`]: sync-lag percentiles, traffic and fault counts, the sync
//!   lag over time, the fault windows and the time to catch up after each
//!   heal, as a table and as JSON;
//! - the private `workload` module: the workload both the deterministic and the real-stack
//!   mode run (provisioning, edge report ticks, the API's writes), drawn
//!   from the seed in one order;
//! - [`plot`]: the sync-lag plot of a report (lag over time with the fault
//!   windows shaded and the heals marked), as SVG;
//! - [`quic`]: the real-stack mode: the same scenarios run by real engines
//!   on real iroh endpoints (QUIC) over a seeded, fault-injecting in-memory
//!   network, in real time, many endpoints in one process. It is not bit
//!   for bit deterministic; its module documentation says how close it gets;
//! - [`processes`]: the real-process mode: a real `outpost-cloud` and real
//!   `outpost-edge` processes in network namespaces ([`netns`]), joined to
//!   the Kubernetes API and read by the harness through [`relay`]s, with
//!   faults applied by nftables and SIGKILL, and checkers on what the
//!   processes report.
//!
//! What the simulated network models and what it does not (connection-level
//! faults only; process crashes, not power loss) is documented on
//! [`world`].
//!
//! It must never be a dependency of another Outpost crate. The
//! deterministic mode never touches the host's network, disk or clock:
//! everything is simulated. The real-stack mode keeps datagrams in memory
//! but runs on the host's clock. The real-process mode runs on the host, in
//! namespaces it creates and deletes.

mod checks;
pub mod nemesis;
pub mod netns;
pub mod plot;
pub mod processes;
pub mod quic;
pub mod relay;
pub mod report;
pub mod scenario;
mod workload;
pub mod world;

pub use report::{Failure, Report};
pub use scenario::{Scenario, ScenarioError};
pub use world::{RunError, World};

/// Runs `scenario` with `seed` to the end and returns its report.
pub fn run(seed: u64, scenario: Scenario) -> Result<Report, RunError> {
    Ok(World::new(seed, scenario)?.run())
}
