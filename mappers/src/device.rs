//! One task per device: connect with backoff, read every collect cycle, serve
//! writes, report values and online/offline changes.
//!
//! Each device runs in its own tokio task with its own driver, so a device that
//! hangs until its timeout, refuses connections or floods exceptions only
//! delays itself. Reports go to a bounded channel: when the consumer lags, a
//! device's value reports are coalesced (a newer reading of a property
//! replaces the one waiting, counted in the log) and the result waits for
//! room, so the latest value of every property always arrives and a slow
//! consumer sees fewer reports, not stale ones. State changes wait for room
//! too, because a lost "offline" would leave a stale state behind.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::driver::{Changes, DeviceState, Driver, Health, Reading, WriteError};

/// What a device task reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// Values read in one collect cycle, or changes pushed by the device.
    Values {
        /// The device id (`namespace/name`).
        device: String,
        /// The readings.
        readings: Vec<Reading>,
    },
    /// The device went online or offline.
    State {
        /// The device id.
        device: String,
        /// The new state.
        state: DeviceState,
        /// The error that made it offline, if any.
        error: Option<String>,
    },
}

/// How a device task runs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Time between two reads of every property.
    pub collect_cycle: Duration,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Seed of the jitter (vary it per device).
    pub seed: u64,
    /// Told of every connect, read and write, for metrics.
    pub observer: Option<Arc<dyn Observer>>,
}

/// An operation of a device task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Connecting to the device.
    Connect,
    /// Reading every property once.
    Read,
    /// Writing a property.
    Write,
}

impl Op {
    /// Its name as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

/// Watches a device task's operations (how long each took, whether it
/// failed), e.g. to count them in metrics. Called on the device's task:
/// keep it quick.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// One operation ended; `ok` is false when it or any property in it failed.
    fn observe(&self, op: Op, elapsed: Duration, ok: bool);
}

fn observe(config: &RunConfig, op: Op, started: Instant, ok: bool) {
    if let Some(o) = &config.observer {
        o.observe(op, started.elapsed(), ok);
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            collect_cycle: Duration::from_secs(1),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            seed: 0,
            observer: None,
        }
    }
}

#[derive(Debug)]
enum Command {
    Write {
        property: String,
        value: String,
        reply: oneshot::Sender<Result<(), WriteError>>,
    },
}

/// A running device task; dropping it stops the task.
#[derive(Debug)]
pub struct DeviceHandle {
    sender: DeviceSender,
    task: JoinHandle<()>,
}

/// A cloneable way to send writes to a device's task.
#[derive(Debug, Clone)]
pub struct DeviceSender {
    id: String,
    commands: flume::Sender<Box<Command>>,
}

impl DeviceSender {
    /// Writes a property through the device's task (checked against the model
    /// first). Waits for the device's answer or its timeout.
    pub async fn write(
        &self,
        property: &str,
        value: &str,
    ) -> Result<Result<(), WriteError>, Stopped> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send_async(Box::new(Command::Write {
                property: property.to_owned(),
                value: value.to_owned(),
                reply,
            }))
            .await
            .map_err(|_| Stopped(self.id.clone()))?;
        answer.await.map_err(|_| Stopped(self.id.clone()))
    }
}

/// The device task is gone.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("device {0} is not running")]
pub struct Stopped(pub String);

impl DeviceHandle {
    /// The device id.
    pub fn id(&self) -> &str {
        &self.sender.id
    }

    /// Writes a property through the device's task (checked against the model
    /// first). Waits for the device's answer or its timeout.
    pub async fn write(
        &self,
        property: &str,
        value: &str,
    ) -> Result<Result<(), WriteError>, Stopped> {
        self.sender.write(property, value).await
    }

    /// A sender for writes that outlives a borrow of the handle.
    pub fn sender(&self) -> DeviceSender {
        self.sender.clone()
    }

    /// Stops the task (the connection closes with it).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for DeviceHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes waiting for a device's task; more wait for room.
const COMMANDS_CAPACITY: usize = 4;

/// Starts a device's task.
pub fn spawn<D: Driver + 'static>(
    id: impl Into<String>,
    driver: D,
    config: RunConfig,
    reports: mpsc::Sender<Report>,
) -> DeviceHandle {
    let id = id.into();
    // A flume channel, as a driver's changes (see `driver::Changes`): every
    // device has one, mostly idle. Boxed commands keep its slots small.
    let (commands, inbox) = flume::bounded(COMMANDS_CAPACITY);
    let task = tokio::spawn(run(id.clone(), driver, config, reports, inbox));
    DeviceHandle {
        sender: DeviceSender { id, commands },
        task,
    }
}

/// A device's task. An `async` block rather than an `async fn`: the
/// function's future would keep its arguments twice (once as captured,
/// once moved into the body), 520 bytes more in each device's task.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn run<D: Driver>(
    id: String,
    mut driver: D,
    config: RunConfig,
    reports: mpsc::Sender<Report>,
    inbox: flume::Receiver<Box<Command>>,
) -> impl Future<Output = ()> {
    async move {
        let mut backoff = Backoff::new(config.backoff_base, config.backoff_max, config.seed);
        let mut changes = driver.take_changes();
        let mut state = driver.health().state();
        // One timer for both states: the collect cycle while connected, the
        // next reconnect while not (a timer of its own would add 112 bytes
        // to every device's task).
        let mut tick = tokio::time::interval(config.collect_cycle.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut next_connect = Instant::now();
        let mut coalesced: u64 = 0;
        // Value reports waiting for room in `reports`.
        let mut unsent: Option<Vec<Reading>> = None;
        let mut link: Option<watch::Receiver<bool>> = None;
        let mut upkeep = driver.maintenance_interval().map(|every| {
            let mut t = tokio::time::interval(every.max(Duration::from_millis(1)));
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            t
        });
        loop {
            if !driver.is_connected() && Instant::now() >= next_connect {
                let started = Instant::now();
                // Boxed: the task's own future then holds a pointer, not the
                // driver's largest future.
                let connected = Box::pin(driver.connect()).await;
                observe(&config, Op::Connect, started, connected.is_ok());
                match connected {
                    // The backoff is reset by a successful read, not by the
                    // connect: a device that accepts connections but never
                    // answers must still be retried ever more slowly.
                    Ok(()) => {
                        debug!(device = %id, "connected");
                        link = driver.link();
                        // Read at once, then every collect cycle.
                        tick.reset_immediately();
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        debug!(device = %id, error = %e, retry_in = ?delay, "connect failed");
                        next_connect = Instant::now() + delay;
                    }
                }
                // Boxed, here and below: a state report is rare, and its
                // future inline would add 450 bytes to every device's task.
                Box::pin(report_state(
                    &id,
                    driver.health().clone(),
                    &mut state,
                    &reports,
                ))
                .await;
            }
            let connected = driver.is_connected();
            if !connected {
                tick.reset_at(next_connect);
            }
            tokio::select! {
                _ = tick.tick() => {
                    if !connected {
                        // Time to reconnect (at the top of the loop).
                        continue;
                    }
                    let started = Instant::now();
                    let read = Box::pin(driver.read()).await;
                    observe(
                        &config,
                        Op::Read,
                        started,
                        read.as_ref().is_ok_and(|r| r.iter().all(|r| r.value.is_ok())),
                    );
                    match read {
                        Ok(readings) => {
                            backoff.reset();
                            offer(&id, &reports, &mut unsent, readings, &mut coalesced);
                        }
                        Err(e) => {
                            let delay = backoff.next_delay();
                            debug!(device = %id, error = %e, retry_in = ?delay, "read failed");
                            next_connect = Instant::now() + delay;
                        }
                    }
                    Box::pin(report_state(&id, driver.health().clone(), &mut state, &reports)).await;
                }
                () = link_down(&mut link), if connected => {
                    let delay = backoff.next_delay();
                    debug!(device = %id, retry_in = ?delay, "connection lost");
                    next_connect = Instant::now() + delay;
                    link = None;
                }
                () = upkeep_tick(&mut upkeep), if connected => {
                    // Boxed, as the other driver calls: inline, the largest
                    // driver's upkeep future (OPC UA's) would make every
                    // device's task 1.3 KB larger.
                    if let Err(e) = Box::pin(driver.maintain()).await {
                        let delay = backoff.next_delay();
                        debug!(device = %id, error = %e, retry_in = ?delay, "upkeep failed");
                        next_connect = Instant::now() + delay;
                    }
                    Box::pin(report_state(&id, driver.health().clone(), &mut state, &reports)).await;
                }
                change = recv_change(&mut changes) => {
                    match change {
                        Some(reading) => {
                            offer(&id, &reports, &mut unsent, vec![reading], &mut coalesced);
                        }
                        None => changes = None,
                    }
                }
                permit = room(&reports), if unsent.is_some() => {
                    let readings = unsent.take().unwrap_or_default();
                    if let Ok(permit) = permit {
                        permit.send(Report::Values { device: id.clone(), readings });
                    }
                }
                command = inbox.recv_async() => {
                    let Ok(Command::Write { property, value, reply }) = command.map(|c| *c) else {
                        debug!(device = %id, "handle dropped; stopping");
                        return;
                    };
                    let result = if driver.is_connected() {
                        let started = Instant::now();
                        let result = Box::pin(driver.write(&property, &value)).await;
                        observe(&config, Op::Write, started, result.is_ok());
                        result
                    } else {
                        // Check the value anyway, so a bad write is refused
                        // for what it is rather than for the connection.
                        match driver.properties().iter().find(|p| p.name == property) {
                            None => Err(WriteError::UnknownProperty(property)),
                            Some(p) => p.check_write(&value).map_err(WriteError::from).and(Err(WriteError::NotConnected)),
                        }
                    };
                    let _ = reply.send(result);
                    Box::pin(report_state(&id, driver.health().clone(), &mut state, &reports)).await;
                }
            }
        }
    }
}

/// Sends readings as a value report, merged into those still waiting; when
/// there is no room they wait (see the module docs).
fn offer(
    id: &str,
    reports: &mpsc::Sender<Report>,
    unsent: &mut Option<Vec<Reading>>,
    readings: Vec<Reading>,
    coalesced: &mut u64,
) {
    let merged = match unsent.take() {
        None => readings,
        Some(mut waiting) => {
            for r in readings {
                match waiting.iter_mut().find(|w| w.property == r.property) {
                    Some(w) => *w = r,
                    None => waiting.push(r),
                }
            }
            waiting
        }
    };
    match reports.try_send(Report::Values {
        device: id.to_owned(),
        readings: merged,
    }) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(report)) => {
            if let Report::Values { readings, .. } = report {
                *unsent = Some(readings);
            }
            *coalesced += 1;
            if coalesced.is_power_of_two() {
                warn!(device = %id, coalesced, "report consumer lags; value reports coalesced");
            }
        }
    }
}

/// Room for one report. Boxed: waiting for room is rare, and the future
/// inline would add 136 bytes to every device's task. The box is made at
/// the first poll, which the loop only does while readings wait.
async fn room(
    reports: &mpsc::Sender<Report>,
) -> Result<mpsc::Permit<'_, Report>, mpsc::error::SendError<()>> {
    Box::pin(reports.reserve()).await
}

async fn link_down(link: &mut Option<watch::Receiver<bool>>) {
    match link {
        Some(rx) => {
            let _ = rx.wait_for(|up| !*up).await;
        }
        None => std::future::pending().await,
    }
}

async fn upkeep_tick(upkeep: &mut Option<tokio::time::Interval>) {
    match upkeep {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn recv_change(changes: &mut Option<Changes>) -> Option<Reading> {
    match changes {
        Some(rx) => rx.recv_async().await.ok().map(|change| *change),
        None => std::future::pending().await,
    }
}

async fn report_state(
    id: &str,
    health: Health,
    last: &mut DeviceState,
    reports: &mpsc::Sender<Report>,
) {
    let now = health.state();
    if now == *last {
        return;
    }
    *last = now;
    let error = health.last_error().map(str::to_owned);
    match now {
        DeviceState::Offline => {
            warn!(device = %id, error = error.as_deref().unwrap_or(""), "offline")
        }
        _ => info!(device = %id, state = now.as_str(), "state changed"),
    }
    let _ = reports
        .send(Report::State {
            device: id.to_owned(),
            state: now,
            error,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{ConnectError, ReadError};
    use crate::property::PropertySpec;

    /// A driver holding `N` bytes of state; it never connects.
    struct Sized<const N: usize> {
        _state: [u8; N],
        health: Health,
    }

    impl<const N: usize> Driver for Sized<N> {
        fn properties(&self) -> &[PropertySpec] {
            &[]
        }
        fn is_connected(&self) -> bool {
            false
        }
        async fn connect(&mut self) -> Result<(), ConnectError> {
            std::future::pending().await
        }
        async fn read(&mut self) -> Result<Vec<Reading>, ReadError> {
            std::future::pending().await
        }
        async fn write(&mut self, _: &str, _: &str) -> Result<(), WriteError> {
            std::future::pending().await
        }
        fn health(&self) -> &Health {
            &self.health
        }
    }

    fn task_size<const N: usize>() -> usize {
        let driver = Sized::<N> {
            _state: [0; N],
            health: Health::default(),
        };
        let (reports, _) = mpsc::channel(1);
        let (_, inbox) = flume::bounded(1);
        std::mem::size_of_val(&run(
            "d".into(),
            driver,
            RunConfig::default(),
            reports,
            inbox,
        ))
    }

    /// Every device has a task, mostly idle: what its loop keeps while it
    /// waits (timers, channel futures, the task's own state) is paid a
    /// thousand times on a node with a thousand devices. Rare waits (a full
    /// report channel, a state report) are boxed so as not to count here.
    #[test]
    fn an_idle_device_task_stays_small() {
        let size = task_size::<0>();
        assert!(
            size <= 1000,
            "a device's task, its driver aside, takes {size} bytes"
        );
    }

    /// Every device has a task: its future holds the driver once, not
    /// twice (an `async fn` would keep its arguments as captured and again
    /// as moved into its body). 2 KB more of driver is 2 KB more of task.
    #[test]
    fn a_device_task_holds_its_driver_once() {
        let grown = task_size::<2048>() - task_size::<0>();
        assert!(
            grown < 3 * 1024,
            "2 KB more of driver made the device task {grown} bytes larger"
        );
    }
}
