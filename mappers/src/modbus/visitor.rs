//! KubeEdge's Modbus visitor: where a property lives and how its registers
//! encode it.
//!
//! `configData: {register, offset, limit, scale, isSwap, isRegisterSwap}`:
//! - `register`: CoilRegister, DiscreteInputRegister, HoldingRegister or
//!   InputRegister;
//! - `offset`: the protocol address of the first register or bit (from 0, as on
//!   the wire);
//! - `limit`: how many registers (or bits) the value spans;
//! - `scale`: numeric values are multiplied by it when read and divided by it
//!   when written;
//! - `isSwap`: swap the two bytes of each register;
//! - `isRegisterSwap`: reverse the order of the 16-bit words.
//!
//! How a data type sits in registers (after the swaps are undone):
//! INT is a big-endian two's complement integer of 1, 2 or 4 registers;
//! FLOAT and DOUBLE are IEEE 754 of 2 (f32) or 4 (f64) registers; STRING is
//! `2 × limit` bytes of UTF-8 padded with NULs; BYTES is `2 × limit` raw bytes;
//! BOOLEAN is one register (non-zero is true). In coils and discrete inputs,
//! BOOLEAN and INT (0 or 1) are one bit.

use crate::config::{ConfigData, ConfigError};
use crate::property::{DataType, PropertySpec, Value, ValueError};

/// A Modbus data table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Register {
    /// Read-write bits.
    Coil,
    /// Read-only bits.
    DiscreteInput,
    /// Read-write 16-bit registers.
    Holding,
    /// Read-only 16-bit registers.
    Input,
}

impl Register {
    /// Parses KubeEdge's names (`HoldingRegister`, ...; the `Register` suffix
    /// and case are optional).
    pub fn parse(text: &str) -> Option<Self> {
        let lower = text.to_ascii_lowercase();
        match lower.strip_suffix("register").unwrap_or(&lower) {
            "coil" => Some(Self::Coil),
            "discreteinput" => Some(Self::DiscreteInput),
            "holding" => Some(Self::Holding),
            "input" => Some(Self::Input),
            _ => None,
        }
    }

    /// Whether the table holds bits rather than registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Self::Coil | Self::DiscreteInput)
    }

    /// Whether the table can be written.
    pub fn is_writable(self) -> bool {
        matches!(self, Self::Coil | Self::Holding)
    }

    /// The most items one read request may ask for (Modbus application
    /// protocol: 125 registers, 2000 bits).
    pub fn max_per_read(self) -> u16 {
        if self.is_bits() { 2000 } else { 125 }
    }
}

/// A Modbus visitor that cannot be used for its property.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VisitorError {
    /// The configData itself is malformed.
    #[error("property {property}: {source}")]
    Config {
        /// The property.
        property: String,
        /// What is wrong.
        source: ConfigError,
    },
    /// The register type is unknown.
    #[error(
        "property {property}: unknown register {found:?}: expected CoilRegister, DiscreteInputRegister, HoldingRegister or InputRegister"
    )]
    UnknownRegister {
        /// The property.
        property: String,
        /// What was found.
        found: String,
    },
    /// The data type, register type and limit do not fit together.
    #[error("property {property}: {data_type} cannot be {limit} item(s) of {register:?}: {reason}")]
    Layout {
        /// The property.
        property: String,
        /// The property's type.
        data_type: DataType,
        /// The register type.
        register: Register,
        /// The limit.
        limit: u16,
        /// Why not.
        reason: &'static str,
    },
}

/// Where one property lives and how it is encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct ModbusVisitor {
    /// The data table.
    pub register: Register,
    /// The address of the first item.
    pub offset: u16,
    /// How many items (registers or bits).
    pub limit: u16,
    /// Numeric scale (1 when absent).
    pub scale: f64,
    /// Swap the bytes within each register.
    pub swap_bytes: bool,
    /// Reverse the order of the registers.
    pub swap_words: bool,
}

impl ModbusVisitor {
    /// Reads a visitor's configData for a property of the given type, and
    /// checks that the layout can carry that type.
    pub fn from_config(
        property: &PropertySpec,
        config: &serde_json::Value,
    ) -> Result<Self, VisitorError> {
        let wrap = |source| VisitorError::Config {
            property: property.name.clone(),
            source,
        };
        let c = ConfigData::new(config).map_err(wrap)?;
        let reg_text = c.required_string("register").map_err(wrap)?;
        let register = Register::parse(reg_text).ok_or_else(|| VisitorError::UnknownRegister {
            property: property.name.clone(),
            found: reg_text.to_owned(),
        })?;
        let offset = c
            .bounded("offset", u64::from(u16::MAX))
            .map_err(wrap)?
            .unwrap_or(0);
        let default_limit = default_limit(register, property.data_type);
        let limit = c
            .bounded("limit", u64::from(u16::MAX))
            .map_err(wrap)?
            .or(default_limit.map(u64::from))
            .ok_or_else(|| wrap(ConfigError::Missing("limit")))?;
        let scale = c.f64("scale").map_err(wrap)?.unwrap_or(1.0);
        if scale == 0.0 {
            return Err(wrap(ConfigError::Invalid {
                key: "scale",
                expected: "a non-zero number",
                found: "0".into(),
            }));
        }
        #[allow(clippy::cast_possible_truncation)]
        let visitor = Self {
            register,
            offset: offset as u16,
            limit: limit as u16,
            scale,
            swap_bytes: c.bool("isSwap").map_err(wrap)?.unwrap_or(false),
            swap_words: c.bool("isRegisterSwap").map_err(wrap)?.unwrap_or(false),
        };
        visitor.check_layout(property)?;
        Ok(visitor)
    }

    /// A visitor with the defaults for a data type (limit from the type,
    /// scale 1, no swaps).
    pub fn new(register: Register, offset: u16, limit: u16) -> Self {
        Self {
            register,
            offset,
            limit,
            scale: 1.0,
            swap_bytes: false,
            swap_words: false,
        }
    }

    fn check_layout(&self, property: &PropertySpec) -> Result<(), VisitorError> {
        let bad = |reason| VisitorError::Layout {
            property: property.name.clone(),
            data_type: property.data_type,
            register: self.register,
            limit: self.limit,
            reason,
        };
        if self.limit == 0 {
            return Err(bad("limit must be at least 1"));
        }
        if self.limit > self.register.max_per_read() {
            return Err(bad("more than one Modbus request can read"));
        }
        if u32::from(self.offset) + u32::from(self.limit) > 0x1_0000 {
            return Err(bad("runs past address 65535"));
        }
        if self.register.is_bits() {
            return match (property.data_type, self.limit) {
                (DataType::Boolean | DataType::Int, 1) => Ok(()),
                (DataType::Boolean | DataType::Int, _) => Err(bad("a bit property has limit 1")),
                _ => Err(bad("coils and discrete inputs carry BOOLEAN or INT only")),
            };
        }
        match (property.data_type, self.limit) {
            (DataType::Int, 1 | 2 | 4) => Ok(()),
            (DataType::Int, _) => Err(bad("INT spans 1, 2 or 4 registers")),
            (DataType::Float | DataType::Double, 2 | 4) => Ok(()),
            (DataType::Float | DataType::Double, _) => {
                Err(bad("FLOAT and DOUBLE span 2 or 4 registers"))
            }
            (DataType::Boolean, 1) => Ok(()),
            (DataType::Boolean, _) => Err(bad("a BOOLEAN register property has limit 1")),
            (DataType::String | DataType::Bytes, _) => Ok(()),
        }
    }

    /// Turns the registers read at `offset..offset+limit` into a value.
    pub fn decode_registers(
        &self,
        data_type: DataType,
        registers: &[u16],
    ) -> Result<Value, DecodeError> {
        if registers.len() != usize::from(self.limit) {
            return Err(DecodeError::Length {
                expected: usize::from(self.limit),
                found: registers.len(),
            });
        }
        let bytes = self.unswap(registers);
        let value = match data_type {
            DataType::Int => {
                let raw = match bytes.len() {
                    2 => i64::from(i16::from_be_bytes([bytes[0], bytes[1]])),
                    4 => i64::from(i32::from_be_bytes(array(&bytes)?)),
                    8 => i64::from_be_bytes(array(&bytes)?),
                    n => {
                        return Err(DecodeError::Length {
                            expected: 2,
                            found: n / 2,
                        });
                    }
                };
                self.scaled_int(raw)
            }
            DataType::Float | DataType::Double => {
                let raw = match bytes.len() {
                    4 => f64::from(f32::from_be_bytes(array(&bytes)?)),
                    8 => f64::from_be_bytes(array(&bytes)?),
                    n => {
                        return Err(DecodeError::Length {
                            expected: 2,
                            found: n / 2,
                        });
                    }
                };
                let scaled = raw * self.scale;
                if data_type == DataType::Float && bytes.len() == 4 {
                    #[allow(clippy::cast_possible_truncation)]
                    Value::Float(scaled as f32)
                } else {
                    Value::Double(scaled)
                }
            }
            DataType::Boolean => Value::Boolean(bytes.iter().any(|b| *b != 0)),
            DataType::String => {
                let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
                let text = std::str::from_utf8(&bytes[..end]).map_err(|_| DecodeError::NotUtf8)?;
                Value::String(text.to_owned())
            }
            DataType::Bytes => Value::Bytes(bytes),
        };
        Ok(value)
    }

    /// Turns the bit read at `offset` into a value.
    pub fn decode_bit(&self, data_type: DataType, bit: bool) -> Value {
        match data_type {
            DataType::Int => Value::Int(i64::from(bit)),
            _ => Value::Boolean(bit),
        }
    }

    fn scaled_int(&self, raw: i64) -> Value {
        if self.scale == 1.0 {
            Value::Int(raw)
        } else {
            Value::Double(raw as f64 * self.scale)
        }
    }

    /// Encodes a checked value as the registers to write at `offset`.
    pub fn encode_registers(
        &self,
        property: &PropertySpec,
        value: &Value,
    ) -> Result<Vec<u16>, ValueError> {
        let does_not_fit = |reason: String| ValueError::DoesNotFit {
            property: property.name.clone(),
            reason,
        };
        let width = usize::from(self.limit) * 2;
        let bytes: Vec<u8> = match (property.data_type, value) {
            (DataType::Int, v) => {
                let number = v
                    .as_f64()
                    .ok_or_else(|| does_not_fit(format!("{v:?} is not a number")))?;
                let raw = match v {
                    Value::Int(i) if self.scale == 1.0 => *i,
                    _ => {
                        let raw = number / self.scale;
                        let rounded = raw.round();
                        if (raw - rounded).abs() > 1e-6 * rounded.abs().max(1.0) {
                            return Err(does_not_fit(format!(
                                "{number} is not a multiple of the scale {}",
                                self.scale
                            )));
                        }
                        if rounded < i64::MIN as f64 || rounded > i64::MAX as f64 {
                            return Err(does_not_fit(format!("{number} does not fit 64 bits")));
                        }
                        #[allow(clippy::cast_possible_truncation)]
                        let r = rounded as i64;
                        r
                    }
                };
                match width {
                    2 => i16::try_from(raw)
                        .map_err(|_| does_not_fit(format!("raw value {raw} does not fit 16 bits")))?
                        .to_be_bytes()
                        .to_vec(),
                    4 => i32::try_from(raw)
                        .map_err(|_| does_not_fit(format!("raw value {raw} does not fit 32 bits")))?
                        .to_be_bytes()
                        .to_vec(),
                    _ => raw.to_be_bytes().to_vec(),
                }
            }
            (DataType::Float | DataType::Double, v) => {
                let number = v
                    .as_f64()
                    .ok_or_else(|| does_not_fit(format!("{v:?} is not a number")))?
                    / self.scale;
                if width == 4 {
                    #[allow(clippy::cast_possible_truncation)]
                    let narrow = number as f32;
                    if !narrow.is_finite() {
                        return Err(does_not_fit(format!(
                            "{number} does not fit a 32-bit float"
                        )));
                    }
                    narrow.to_be_bytes().to_vec()
                } else {
                    number.to_be_bytes().to_vec()
                }
            }
            (DataType::Boolean, Value::Boolean(b)) => vec![0, u8::from(*b)],
            (DataType::String, Value::String(s)) => padded(s.as_bytes(), width)
                .ok_or_else(|| does_not_fit(format!("{} bytes exceed {width}", s.len())))?,
            (DataType::Bytes, Value::Bytes(b)) => {
                if b.len() != width {
                    return Err(does_not_fit(format!(
                        "BYTES here are exactly {width} bytes, got {}",
                        b.len()
                    )));
                }
                b.clone()
            }
            (t, v) => return Err(does_not_fit(format!("{v:?} is not a {t} value"))),
        };
        Ok(self.swap(&bytes))
    }

    /// Undoes the swaps: registers as read, bytes in big-endian order.
    fn unswap(&self, registers: &[u16]) -> Vec<u8> {
        let mut words: Vec<u16> = registers.to_vec();
        if self.swap_words {
            words.reverse();
        }
        words
            .iter()
            .flat_map(|w| {
                let b = w.to_be_bytes();
                if self.swap_bytes { [b[1], b[0]] } else { b }
            })
            .collect()
    }

    /// Applies the swaps: big-endian bytes to the registers to write.
    fn swap(&self, bytes: &[u8]) -> Vec<u16> {
        let mut words: Vec<u16> = bytes
            .chunks(2)
            .map(|c| {
                let (hi, lo) = (c[0], c.get(1).copied().unwrap_or(0));
                if self.swap_bytes {
                    u16::from_be_bytes([lo, hi])
                } else {
                    u16::from_be_bytes([hi, lo])
                }
            })
            .collect();
        if self.swap_words {
            words.reverse();
        }
        words
    }
}

/// Registers that do not decode as the property's type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The device returned a different number of registers than asked for.
    #[error("expected {expected} registers, got {found}")]
    Length {
        /// Asked for.
        expected: usize,
        /// Returned.
        found: usize,
    },
    /// A STRING property's bytes are not UTF-8.
    #[error("the registers are not UTF-8 text")]
    NotUtf8,
}

fn default_limit(register: Register, data_type: DataType) -> Option<u16> {
    if register.is_bits() {
        return Some(1);
    }
    match data_type {
        DataType::Int | DataType::Boolean => Some(1),
        DataType::Float => Some(2),
        DataType::Double => Some(4),
        DataType::String | DataType::Bytes => None,
    }
}

fn array<const N: usize>(bytes: &[u8]) -> Result<[u8; N], DecodeError> {
    bytes.try_into().map_err(|_| DecodeError::Length {
        expected: N / 2,
        found: bytes.len() / 2,
    })
}

fn padded(text: &[u8], width: usize) -> Option<Vec<u8>> {
    if text.len() > width {
        return None;
    }
    let mut out = text.to_vec();
    out.resize(width, 0);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn visitor(p: &PropertySpec, config: serde_json::Value) -> ModbusVisitor {
        ModbusVisitor::from_config(p, &config).unwrap()
    }

    #[test]
    fn kubeedge_config_is_read() {
        let p = PropertySpec::new("temp", DataType::Int);
        let v = visitor(
            &p,
            json!({"register": "HoldingRegister", "offset": 2, "limit": 1, "scale": 1, "isSwap": true, "isRegisterSwap": true}),
        );
        assert_eq!(v.register, Register::Holding);
        assert_eq!((v.offset, v.limit), (2, 1));
        assert!(v.swap_bytes && v.swap_words);
        let f = PropertySpec::new("power", DataType::Float);
        let v = visitor(&f, json!({"register": "InputRegister", "offset": "7"}));
        assert_eq!((v.register, v.offset, v.limit), (Register::Input, 7, 2));
    }

    #[test]
    fn bad_visitors_are_refused() {
        let p = PropertySpec::new("x", DataType::Int);
        let err = |c| ModbusVisitor::from_config(&p, &c).unwrap_err();
        assert!(matches!(
            err(json!({"offset": 1})),
            VisitorError::Config { .. }
        ));
        assert!(matches!(
            err(json!({"register": "Bogus"})),
            VisitorError::UnknownRegister { .. }
        ));
        assert!(matches!(
            err(json!({"register": "HoldingRegister", "limit": 3})),
            VisitorError::Layout { .. }
        ));
        assert!(matches!(
            err(json!({"register": "HoldingRegister", "offset": -1})),
            VisitorError::Config { .. }
        ));
        assert!(matches!(
            err(json!({"register": "HoldingRegister", "offset": 65535, "limit": 2})),
            VisitorError::Layout { .. }
        ));
        assert!(matches!(
            err(json!({"register": "HoldingRegister", "scale": 0})),
            VisitorError::Config { .. }
        ));
        assert!(matches!(
            err(json!({"register": "CoilRegister", "limit": 2})),
            VisitorError::Layout { .. }
        ));
        let s = PropertySpec::new("s", DataType::String);
        assert!(ModbusVisitor::from_config(&s, &json!({"register": "HoldingRegister"})).is_err());
        assert!(
            ModbusVisitor::from_config(&s, &json!({"register": "HoldingRegister", "limit": 126}))
                .is_err()
        );
        assert!(ModbusVisitor::from_config(&s, &json!("HoldingRegister")).is_err());
    }

    #[test]
    fn swaps_and_scale_round_trip() {
        let p = PropertySpec::new("power", DataType::Float);
        // 1500.5 as f32 is 0x44BB9000.
        let plain = ModbusVisitor::new(Register::Holding, 2, 2);
        assert_eq!(
            plain.decode_registers(DataType::Float, &[0x44BB, 0x9000]),
            Ok(Value::Float(1500.5))
        );
        let words = ModbusVisitor {
            swap_words: true,
            ..plain.clone()
        };
        assert_eq!(
            words.decode_registers(DataType::Float, &[0x9000, 0x44BB]),
            Ok(Value::Float(1500.5))
        );
        let bytes = ModbusVisitor {
            swap_bytes: true,
            ..plain.clone()
        };
        assert_eq!(
            bytes.decode_registers(DataType::Float, &[0xBB44, 0x0090]),
            Ok(Value::Float(1500.5))
        );
        let both = ModbusVisitor {
            swap_bytes: true,
            swap_words: true,
            ..plain.clone()
        };
        assert_eq!(
            both.encode_registers(&p, &Value::Float(1500.5)),
            Ok(vec![0x0090, 0xBB44])
        );

        let t = PropertySpec::new("setpoint", DataType::Int);
        let scaled = ModbusVisitor {
            scale: 0.1,
            ..ModbusVisitor::new(Register::Holding, 0, 1)
        };
        assert_eq!(
            scaled
                .decode_registers(DataType::Int, &[215])
                .unwrap()
                .to_string(),
            "21.5"
        );
        assert_eq!(
            scaled.encode_registers(&t, &Value::Double(22.5)),
            Ok(vec![225])
        );
        assert!(scaled.encode_registers(&t, &Value::Double(22.55)).is_err());
        let unscaled = ModbusVisitor::new(Register::Holding, 0, 1);
        assert_eq!(
            unscaled.decode_registers(DataType::Int, &[0xFFFF]),
            Ok(Value::Int(-1))
        );
        assert!(unscaled.encode_registers(&t, &Value::Int(40000)).is_err());
        assert!(unscaled.encode_registers(&t, &Value::Double(1.5)).is_err());
        let wide = ModbusVisitor::new(Register::Holding, 4, 2);
        assert_eq!(
            wide.decode_registers(DataType::Int, &[1, 2]),
            Ok(Value::Int(0x0001_0002))
        );
        let d = ModbusVisitor::new(Register::Holding, 0, 4);
        let dp = PropertySpec::new("d", DataType::Double);
        let regs = d.encode_registers(&dp, &Value::Double(-2.25)).unwrap();
        assert_eq!(
            d.decode_registers(DataType::Double, &regs),
            Ok(Value::Double(-2.25))
        );
    }

    #[test]
    fn strings_bytes_and_bools() {
        let s = PropertySpec::new("name", DataType::String);
        let v = ModbusVisitor::new(Register::Holding, 6, 8);
        let regs = v
            .encode_registers(&s, &Value::String("thermo-1".into()))
            .unwrap();
        assert_eq!(regs[0], u16::from_be_bytes(*b"th"));
        assert_eq!(regs.len(), 8);
        assert_eq!(
            v.decode_registers(DataType::String, &regs),
            Ok(Value::String("thermo-1".into()))
        );
        assert!(
            v.encode_registers(&s, &Value::String("x".repeat(17)))
                .is_err()
        );
        assert_eq!(
            v.decode_registers(DataType::String, &[0xFFFE; 8]),
            Err(DecodeError::NotUtf8)
        );
        assert!(matches!(
            v.decode_registers(DataType::String, &[0; 3]),
            Err(DecodeError::Length { .. })
        ));
        let b = PropertySpec::new("raw", DataType::Bytes);
        let bv = ModbusVisitor::new(Register::Holding, 0, 1);
        assert_eq!(
            bv.encode_registers(&b, &Value::Bytes(vec![1, 2])),
            Ok(vec![0x0102])
        );
        assert!(bv.encode_registers(&b, &Value::Bytes(vec![1])).is_err());
        let f = PropertySpec::new("on", DataType::Boolean);
        assert_eq!(bv.encode_registers(&f, &Value::Boolean(true)), Ok(vec![1]));
        assert!(bv.encode_registers(&f, &Value::Int(1)).is_err());
    }
}
