//! The Modbus driver: Modbus TCP, and RTU framing over a TCP stream (serial
//! gateways, RTU-over-TCP devices), with tokio-modbus.
//!
//! tokio-modbus has no request timeout, no reconnect and no request-size
//! limit, so this driver supplies all three: every request is bounded by the
//! configured timeout, a connection that timed out or failed is dropped (so a
//! late reply can never be taken as the answer to the next request), and reads
//! are planned by [`plan::plan_reads`] within Modbus' 125-register limit.
//!
//! A merged read answered with an exception (one property at a bad address
//! spoils the whole range) is retried property by property, so the other
//! properties still get their values and only the bad one reports the
//! exception.

pub mod plan;
pub mod visitor;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::{ExceptionCode, Slave};

use crate::config::{ConfigData, ConfigError};
use crate::driver::{ConnectError, Driver, Health, PropertyError, ReadError, Reading, WriteError};
use crate::property::{PropertySpec, Value, ValueError};
use plan::{ReadRequest, plan_reads};
use visitor::{ModbusVisitor, Register};

/// How frames are put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Modbus TCP (MBAP header).
    Tcp,
    /// RTU frames (address, PDU, CRC) carried over a TCP stream.
    RtuOverTcp,
}

/// Where and how to reach a Modbus device.
#[derive(Debug, Clone, PartialEq)]
pub struct ModbusConfig {
    /// The device's (or gateway's) address.
    pub addr: SocketAddr,
    /// The framing.
    pub framing: Framing,
    /// The unit (slave) id.
    pub slave: u8,
    /// The bound on connecting and on each request.
    pub timeout: Duration,
    /// How many unused registers a read may span to merge two properties.
    pub max_gap: u16,
}

impl ModbusConfig {
    /// A Modbus TCP device at `addr`, unit 1, 1 s timeout.
    pub fn tcp(addr: SocketAddr) -> Self {
        Self {
            addr,
            framing: Framing::Tcp,
            slave: 1,
            timeout: Duration::from_secs(1),
            max_gap: 0,
        }
    }

    /// Reads a Device's protocol configData: `{ip, port, slaveID}` as in
    /// KubeEdge, plus `framing: rtu` for RTU over TCP and `timeoutMs`.
    pub fn from_config(config: &serde_json::Value) -> Result<Self, ConfigError> {
        let c = ConfigData::new(config)?;
        let ip = c.required_string("ip")?;
        let port = c.bounded("port", u64::from(u16::MAX))?.unwrap_or(502);
        let addr: SocketAddr = format!("{ip}:{port}")
            .parse()
            .or_else(|_| format!("[{ip}]:{port}").parse())
            .map_err(|_| ConfigError::Invalid {
                key: "ip",
                expected: "an IP address",
                found: ip.to_owned(),
            })?;
        let framing = match c.string("framing")?.map(str::to_ascii_lowercase).as_deref() {
            None | Some("tcp") => Framing::Tcp,
            Some("rtu") => Framing::RtuOverTcp,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    key: "framing",
                    expected: "tcp or rtu",
                    found: other.to_owned(),
                });
            }
        };
        #[allow(clippy::cast_possible_truncation)]
        let slave = c.bounded("slaveID", 255)?.unwrap_or(1) as u8;
        let timeout_ms = c.bounded("timeoutMs", 600_000)?.unwrap_or(1000).max(1);
        #[allow(clippy::cast_possible_truncation)]
        let max_gap = c.bounded("maxGap", 124)?.unwrap_or(0) as u16;
        Ok(Self {
            addr,
            framing,
            slave,
            timeout: Duration::from_millis(timeout_ms),
            max_gap,
        })
    }
}

/// One property of a Modbus device.
#[derive(Debug, Clone, PartialEq)]
pub struct ModbusProperty {
    /// The model's view: name, type, access, bounds.
    pub spec: PropertySpec,
    /// Where it lives.
    pub visitor: ModbusVisitor,
}

/// Request counts, for benchmarks and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModbusStats {
    /// Read and write requests sent.
    pub requests: u64,
    /// Connections opened.
    pub connects: u64,
}

/// A Modbus device.
pub struct ModbusDriver {
    config: ModbusConfig,
    properties: Vec<ModbusProperty>,
    specs: Vec<PropertySpec>,
    plan: Vec<ReadRequest>,
    ctx: Option<Context>,
    health: Health,
    stats: ModbusStats,
}

impl std::fmt::Debug for ModbusDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusDriver")
            .field("config", &self.config)
            .field("properties", &self.properties.len())
            .field("requests_per_read", &self.plan.len())
            .field("connected", &self.ctx.is_some())
            .finish()
    }
}

/// One Modbus request.
#[derive(Debug, Clone, Copy)]
enum Op<'a> {
    Read(Register),
    WriteCoil(bool),
    WriteRegister(u16),
    WriteRegisters(&'a [u16]),
}

impl Op<'_> {
    fn is_read(&self) -> bool {
        matches!(self, Self::Read(_))
    }
}

/// Sends `op`; bits come back as 0/1 words, writes as no words.
async fn call(
    ctx: &mut Context,
    op: Op<'_>,
    start: u16,
    count: u16,
) -> tokio_modbus::Result<Vec<u16>> {
    let bits =
        |r: Result<Vec<bool>, ExceptionCode>| r.map(|b| b.into_iter().map(u16::from).collect());
    Ok(match op {
        Op::Read(Register::Holding) => ctx.read_holding_registers(start, count).await?,
        Op::Read(Register::Input) => ctx.read_input_registers(start, count).await?,
        Op::Read(Register::Coil) => bits(ctx.read_coils(start, count).await?),
        Op::Read(Register::DiscreteInput) => bits(ctx.read_discrete_inputs(start, count).await?),
        Op::WriteCoil(bit) => ctx
            .write_single_coil(start, bit)
            .await?
            .map(|()| Vec::new()),
        Op::WriteRegister(word) => ctx
            .write_single_register(start, word)
            .await?
            .map(|()| Vec::new()),
        Op::WriteRegisters(words) => ctx
            .write_multiple_registers(start, words)
            .await?
            .map(|()| Vec::new()),
    })
}

enum Outcome<T> {
    Answer(T),
    Exception(ExceptionCode),
    Failed(ReadError),
}

impl ModbusDriver {
    /// A driver for the given properties (not yet connected).
    pub fn new(config: ModbusConfig, properties: Vec<ModbusProperty>) -> Self {
        let visitors: Vec<&ModbusVisitor> = properties.iter().map(|p| &p.visitor).collect();
        let plan = plan_reads(&visitors, config.max_gap);
        let specs = properties.iter().map(|p| p.spec.clone()).collect();
        Self {
            config,
            properties,
            specs,
            plan,
            ctx: None,
            health: Health::default(),
            stats: ModbusStats::default(),
        }
    }

    /// The read plan: one entry per request a full read sends.
    pub fn plan(&self) -> &[ReadRequest] {
        &self.plan
    }

    /// Requests sent and connections opened so far.
    pub fn stats(&self) -> ModbusStats {
        self.stats
    }

    /// Drops the connection.
    pub fn disconnect(&mut self) {
        self.ctx = None;
    }

    async fn request(&mut self, op: Op<'_>, start: u16, count: u16) -> Outcome<Vec<u16>> {
        let limit = self.config.timeout;
        let Some(ctx) = self.ctx.as_mut() else {
            return Outcome::Failed(ReadError::NotConnected);
        };
        self.stats.requests += 1;
        let outcome = match timeout(limit, call(ctx, op, start, count)).await {
            Err(_) => Outcome::Failed(ReadError::Timeout(limit)),
            Ok(Err(e)) => Outcome::Failed(ReadError::Transport(e.to_string())),
            Ok(Ok(Err(code))) => Outcome::Exception(code),
            Ok(Ok(Ok(words))) if op.is_read() && words.len() < usize::from(count) => {
                Outcome::Failed(ReadError::Transport(format!(
                    "asked for {count} items at {start}, got {}",
                    words.len()
                )))
            }
            Ok(Ok(Ok(words))) => Outcome::Answer(words),
        };
        if let Outcome::Failed(e) = &outcome {
            tracing::debug!(addr = %self.config.addr, ?op, start, count, error = %e, "modbus request failed; dropping connection");
            self.ctx = None;
            self.health.failure(e);
        }
        outcome
    }

    /// Sends one read request; registers come back as words, bits as 0/1.
    async fn read_range(
        &mut self,
        register: Register,
        start: u16,
        count: u16,
    ) -> Outcome<Vec<u16>> {
        self.request(Op::Read(register), start, count).await
    }

    /// Reads every property along `plan` (the driver's own plan, taken out
    /// of `self` for the duration so that it is not copied per read).
    async fn read_planned(&mut self, plan: &[ReadRequest]) -> Result<Vec<Reading>, ReadError> {
        let mut values: Vec<Option<Result<Value, PropertyError>>> =
            vec![None; self.properties.len()];
        for request in plan {
            match self
                .read_range(request.register, request.start, request.count)
                .await
            {
                Outcome::Failed(e) => return Err(e),
                Outcome::Answer(words) => {
                    for &i in &request.members {
                        values[i] = Some(self.decode(i, request, &words));
                    }
                }
                Outcome::Exception(code) if request.members.len() == 1 => {
                    values[request.members[0]] =
                        Some(Err(PropertyError::Rejected(exception_text(code))));
                }
                Outcome::Exception(_) => {
                    // One bad address spoils a merged range: ask for each
                    // property alone so the others still get their values.
                    for &i in &request.members {
                        let v = self.properties[i].visitor.clone();
                        let single = ReadRequest {
                            register: v.register,
                            start: v.offset,
                            count: v.limit,
                            members: vec![i],
                        };
                        values[i] =
                            Some(match self.read_range(v.register, v.offset, v.limit).await {
                                Outcome::Failed(e) => return Err(e),
                                Outcome::Answer(words) => self.decode(i, &single, &words),
                                Outcome::Exception(code) => {
                                    Err(PropertyError::Rejected(exception_text(code)))
                                }
                            });
                    }
                }
            }
        }
        self.health.success();
        Ok(self
            .properties
            .iter()
            .zip(values)
            .map(|(p, v)| Reading {
                property: p.spec.name.clone(),
                value: v.unwrap_or(Err(PropertyError::NoValue)),
            })
            .collect())
    }

    fn decode(
        &self,
        index: usize,
        request: &ReadRequest,
        words: &[u16],
    ) -> Result<Value, PropertyError> {
        let p = &self.properties[index];
        let slice = &words[request.slice_of(&p.visitor)];
        if p.visitor.register.is_bits() {
            Ok(p.visitor
                .decode_bit(p.spec.data_type, slice.first().is_some_and(|b| *b != 0)))
        } else {
            p.visitor
                .decode_registers(p.spec.data_type, slice)
                .map_err(|e| PropertyError::Decode(e.to_string()))
        }
    }
}

fn exception_text(code: ExceptionCode) -> String {
    format!("modbus exception {code:?}")
}

impl Driver for ModbusDriver {
    fn properties(&self) -> &[PropertySpec] {
        &self.specs
    }

    fn is_connected(&self) -> bool {
        self.ctx.is_some()
    }

    async fn connect(&mut self) -> Result<(), ConnectError> {
        self.ctx = None;
        let limit = self.config.timeout;
        let stream = match timeout(limit, TcpStream::connect(self.config.addr)).await {
            Err(_) => Err(ConnectError::Timeout(limit)),
            Ok(Err(e)) => Err(ConnectError::Transport(e.to_string())),
            Ok(Ok(s)) => Ok(s),
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                self.health.failure(&e);
                return Err(e);
            }
        };
        // Requests are small and answered one at a time: Nagle only adds delay.
        let _ = stream.set_nodelay(true);
        let slave = Slave(self.config.slave);
        self.ctx = Some(match self.config.framing {
            Framing::Tcp => tokio_modbus::client::tcp::attach_slave(stream, slave),
            Framing::RtuOverTcp => tokio_modbus::client::rtu::attach_slave(stream, slave),
        });
        self.stats.connects += 1;
        Ok(())
    }

    async fn read(&mut self) -> Result<Vec<Reading>, ReadError> {
        if self.ctx.is_none() {
            return Err(ReadError::NotConnected);
        }
        let plan = std::mem::take(&mut self.plan);
        let result = self.read_planned(&plan).await;
        self.plan = plan;
        result
    }

    async fn write(&mut self, property: &str, text: &str) -> Result<(), WriteError> {
        let p = self
            .properties
            .iter()
            .find(|p| p.spec.name == property)
            .ok_or_else(|| WriteError::UnknownProperty(property.to_owned()))?;
        let value = p.spec.check_write(text)?;
        let visitor = p.visitor.clone();
        if !visitor.register.is_writable() {
            return Err(WriteError::Refused(ValueError::DoesNotFit {
                property: property.to_owned(),
                reason: format!("{:?} registers are read-only", visitor.register),
            }));
        }
        let addr = visitor.offset;
        let outcome = if visitor.register == Register::Coil {
            let bit = match value {
                Value::Boolean(b) => b,
                Value::Int(0) => false,
                Value::Int(1) => true,
                other => {
                    return Err(WriteError::Refused(ValueError::DoesNotFit {
                        property: property.to_owned(),
                        reason: format!("a coil holds 0 or 1, not {other}"),
                    }));
                }
            };
            self.request(Op::WriteCoil(bit), addr, 1).await
        } else {
            let words = visitor.encode_registers(&p.spec, &value)?;
            if let [word] = words[..] {
                self.request(Op::WriteRegister(word), addr, 1).await
            } else {
                self.request(Op::WriteRegisters(&words), addr, visitor.limit)
                    .await
            }
        };
        match outcome {
            Outcome::Answer(_) => {
                self.health.success();
                Ok(())
            }
            Outcome::Exception(code) => Err(WriteError::Rejected(exception_text(code))),
            Outcome::Failed(ReadError::NotConnected) => Err(WriteError::NotConnected),
            Outcome::Failed(ReadError::Timeout(d)) => Err(WriteError::Timeout(d)),
            Outcome::Failed(ReadError::Transport(e)) => Err(WriteError::Transport(e)),
        }
    }

    fn health(&self) -> &Health {
        &self.health
    }
}
