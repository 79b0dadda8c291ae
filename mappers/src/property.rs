//! Device properties as a KubeEdge DeviceModel declares them, and the values
//! they carry.
//!
//! A DeviceModel gives each property a data type (INT, FLOAT, DOUBLE, STRING,
//! BOOLEAN, BYTES), an access mode and an optional minimum and maximum, all as
//! strings. [`PropertySpec::check_write`] turns the text a user wants written
//! into a typed [`Value`] and refuses, before anything reaches a device, a value
//! of the wrong type, one outside the model's bounds, or any write to a
//! read-only property.
//!
//! Values travel as strings in KubeEdge's twins; [`Value`]'s `Display` gives
//! that string (BYTES as standard base64).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// The data type of a property, as in a DeviceModel's `type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// A signed integer.
    Int,
    /// A 32-bit float (wider on protocols that only know one float).
    Float,
    /// A 64-bit float.
    Double,
    /// UTF-8 text.
    String,
    /// true or false.
    Boolean,
    /// Raw bytes, written as base64 text.
    Bytes,
}

impl DataType {
    /// Parses KubeEdge's spelling (`INT`, `float`, ...; case is ignored).
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        match text.to_ascii_uppercase().as_str() {
            "INT" | "INTEGER" => Ok(Self::Int),
            "FLOAT" => Ok(Self::Float),
            "DOUBLE" => Ok(Self::Double),
            "STRING" => Ok(Self::String),
            "BOOLEAN" | "BOOL" => Ok(Self::Boolean),
            "BYTES" => Ok(Self::Bytes),
            _ => Err(ModelError::UnknownType(text.to_owned())),
        }
    }

    /// KubeEdge's spelling, lower case as twins' metadata carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Int => "int",
            Self::Float => "float",
            Self::Double => "double",
            Self::String => "string",
            Self::Boolean => "boolean",
            Self::Bytes => "bytes",
        }
    }

    /// Whether values of this type are numbers (and so have bounds).
    pub fn is_numeric(self) -> bool {
        matches!(self, Self::Int | Self::Float | Self::Double)
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a property may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessMode {
    /// Read and write (KubeEdge's default).
    #[default]
    ReadWrite,
    /// Read only: every write is refused.
    ReadOnly,
}

impl AccessMode {
    /// Parses `ReadWrite` or `ReadOnly` (case is ignored; empty means ReadWrite).
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        match text.to_ascii_lowercase().as_str() {
            "" | "readwrite" => Ok(Self::ReadWrite),
            "readonly" => Ok(Self::ReadOnly),
            _ => Err(ModelError::UnknownAccessMode(text.to_owned())),
        }
    }
}

/// A value read from or written to a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A signed integer.
    Int(i64),
    /// A 32-bit float.
    Float(f32),
    /// A 64-bit float; also what an integer register read with a scale other
    /// than 1 yields.
    Double(f64),
    /// Text.
    String(String),
    /// A flag.
    Boolean(bool),
    /// Raw bytes.
    Bytes(Vec<u8>),
}

impl Value {
    /// The value as a number, if it is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Int(v) => Some(*v as f64),
            Self::Float(v) => Some(f64::from(*v)),
            Self::Double(v) => Some(*v),
            _ => None,
        }
    }

    /// The data type a twin's metadata gives for this value.
    pub fn data_type(&self) -> DataType {
        match self {
            Self::Int(_) => DataType::Int,
            Self::Float(_) => DataType::Float,
            Self::Double(_) => DataType::Double,
            Self::String(_) => DataType::String,
            Self::Boolean(_) => DataType::Boolean,
            Self::Bytes(_) => DataType::Bytes,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(v) => write!(f, "{v}"),
            Self::Float(v) => write!(f, "{v}"),
            Self::Double(v) => write!(f, "{v}"),
            Self::String(v) => f.write_str(v),
            Self::Boolean(v) => write!(f, "{v}"),
            Self::Bytes(v) => f.write_str(&BASE64.encode(v)),
        }
    }
}

/// A DeviceModel that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// The type is none of INT, FLOAT, DOUBLE, STRING, BOOLEAN, BYTES.
    #[error("unknown property type {0:?}: expected INT, FLOAT, DOUBLE, STRING, BOOLEAN or BYTES")]
    UnknownType(String),
    /// The access mode is neither ReadWrite nor ReadOnly.
    #[error("unknown access mode {0:?}: expected ReadWrite or ReadOnly")]
    UnknownAccessMode(String),
    /// A minimum or maximum that is not a number.
    #[error("property {property}: {which} {text:?} is not a number")]
    BadBound {
        /// The property.
        property: String,
        /// `minimum` or `maximum`.
        which: &'static str,
        /// The text found.
        text: String,
    },
}

/// A write refused before it reached the device.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    /// The property is read-only.
    #[error("property {property} is read-only")]
    ReadOnly {
        /// The property.
        property: String,
    },
    /// The text is not a value of the property's type.
    #[error("property {property} is {expected}: {text:?} is not a {expected} value")]
    WrongType {
        /// The property.
        property: String,
        /// Its type.
        expected: DataType,
        /// What was given.
        text: String,
    },
    /// The value is below the model's minimum or above its maximum.
    #[error("property {property}: {value} is outside [{minimum}, {maximum}]")]
    OutOfRange {
        /// The property.
        property: String,
        /// The value given.
        value: f64,
        /// The model's minimum (-inf when absent).
        minimum: f64,
        /// The model's maximum (+inf when absent).
        maximum: f64,
    },
    /// The value is of the right type but the property's visitor cannot carry
    /// it (too long a string, a fraction on an integer register, ...).
    #[error("property {property}: {reason}")]
    DoesNotFit {
        /// The property.
        property: String,
        /// Why.
        reason: String,
    },
}

/// One property of a DeviceModel.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertySpec {
    /// The property name, unique within its model.
    pub name: String,
    /// Its data type.
    pub data_type: DataType,
    /// Whether it may be written.
    pub access: AccessMode,
    /// The smallest value a write may set, for numeric types.
    pub minimum: Option<f64>,
    /// The largest value a write may set, for numeric types.
    pub maximum: Option<f64>,
}

impl PropertySpec {
    /// A read-write property with no bounds.
    pub fn new(name: impl Into<String>, data_type: DataType) -> Self {
        Self {
            name: name.into(),
            data_type,
            access: AccessMode::ReadWrite,
            minimum: None,
            maximum: None,
        }
    }

    /// Builds a property from a DeviceModel's strings (empty strings mean
    /// absent, as in KubeEdge).
    pub fn from_model(
        name: &str,
        data_type: &str,
        access: &str,
        minimum: &str,
        maximum: &str,
    ) -> Result<Self, ModelError> {
        let bound = |which: &'static str, text: &str| -> Result<Option<f64>, ModelError> {
            let text = text.trim();
            if text.is_empty() {
                return Ok(None);
            }
            text.parse::<f64>()
                .ok()
                .filter(|v| !v.is_nan())
                .map(Some)
                .ok_or_else(|| ModelError::BadBound {
                    property: name.to_owned(),
                    which,
                    text: text.to_owned(),
                })
        };
        Ok(Self {
            name: name.to_owned(),
            data_type: DataType::parse(data_type)?,
            access: AccessMode::parse(access)?,
            minimum: bound("minimum", minimum)?,
            maximum: bound("maximum", maximum)?,
        })
    }

    /// Sets the bounds.
    pub fn with_bounds(mut self, minimum: Option<f64>, maximum: Option<f64>) -> Self {
        self.minimum = minimum;
        self.maximum = maximum;
        self
    }

    /// Makes the property read-only.
    pub fn read_only(mut self) -> Self {
        self.access = AccessMode::ReadOnly;
        self
    }

    /// Checks a write and returns the typed value to send.
    ///
    /// INT accepts a decimal too (as a [`Value::Double`]), because an integer
    /// register with a scale holds decimals; the visitor then refuses a value
    /// that is not a multiple of its scale.
    pub fn check_write(&self, text: &str) -> Result<Value, ValueError> {
        if self.access == AccessMode::ReadOnly {
            return Err(ValueError::ReadOnly {
                property: self.name.clone(),
            });
        }
        let wrong = || ValueError::WrongType {
            property: self.name.clone(),
            expected: self.data_type,
            text: text.to_owned(),
        };
        let trimmed = text.trim();
        let value = match self.data_type {
            DataType::Int => match trimmed.parse::<i64>() {
                Ok(v) => Value::Int(v),
                Err(_) => Value::Double(parse_finite(trimmed).ok_or_else(wrong)?),
            },
            DataType::Float => {
                let v = parse_finite(trimmed).ok_or_else(wrong)?;
                #[allow(clippy::cast_possible_truncation)]
                let narrow = v as f32;
                if !narrow.is_finite() {
                    return Err(wrong());
                }
                Value::Float(narrow)
            }
            DataType::Double => Value::Double(parse_finite(trimmed).ok_or_else(wrong)?),
            DataType::String => Value::String(text.to_owned()),
            DataType::Boolean => match trimmed.to_ascii_lowercase().as_str() {
                "true" | "1" => Value::Boolean(true),
                "false" | "0" => Value::Boolean(false),
                _ => return Err(wrong()),
            },
            DataType::Bytes => Value::Bytes(BASE64.decode(trimmed).map_err(|_| wrong())?),
        };
        self.check_bounds(&value)?;
        Ok(value)
    }

    /// Checks a typed value against the model's bounds.
    pub fn check_bounds(&self, value: &Value) -> Result<(), ValueError> {
        let Some(v) = value.as_f64() else {
            return Ok(());
        };
        let minimum = self.minimum.unwrap_or(f64::NEG_INFINITY);
        let maximum = self.maximum.unwrap_or(f64::INFINITY);
        if v < minimum || v > maximum {
            return Err(ValueError::OutOfRange {
                property: self.name.clone(),
                value: v,
                minimum,
                maximum,
            });
        }
        Ok(())
    }
}

fn parse_finite(text: &str) -> Option<f64> {
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> PropertySpec {
        PropertySpec::from_model("temp", "INT", "ReadWrite", "1", "100").unwrap()
    }

    #[test]
    fn writes_are_typed_and_bounded() {
        assert_eq!(temp().check_write("30"), Ok(Value::Int(30)));
        assert_eq!(temp().check_write("21.5"), Ok(Value::Double(21.5)));
        assert!(matches!(
            temp().check_write("101"),
            Err(ValueError::OutOfRange { .. })
        ));
        assert!(matches!(
            temp().check_write("0"),
            Err(ValueError::OutOfRange { .. })
        ));
        assert!(matches!(
            temp().check_write("hot"),
            Err(ValueError::WrongType { .. })
        ));
        assert!(matches!(
            temp().check_write("NaN"),
            Err(ValueError::WrongType { .. })
        ));
        let flag = PropertySpec::new("on", DataType::Boolean);
        assert_eq!(flag.check_write("true"), Ok(Value::Boolean(true)));
        assert!(matches!(
            flag.check_write("yes"),
            Err(ValueError::WrongType { .. })
        ));
        let blob = PropertySpec::new("blob", DataType::Bytes);
        assert_eq!(blob.check_write("AQI="), Ok(Value::Bytes(vec![1, 2])));
        assert!(matches!(
            blob.check_write("!!"),
            Err(ValueError::WrongType { .. })
        ));
        let float = PropertySpec::new("f", DataType::Float);
        assert!(matches!(
            float.check_write("1e300"),
            Err(ValueError::WrongType { .. })
        ));
        let ro = PropertySpec::new("r", DataType::Int).read_only();
        assert!(matches!(
            ro.check_write("1"),
            Err(ValueError::ReadOnly { .. })
        ));
    }

    #[test]
    fn model_strings_are_checked() {
        assert!(matches!(
            PropertySpec::from_model("x", "STREAM", "", "", ""),
            Err(ModelError::UnknownType(_))
        ));
        assert!(matches!(
            PropertySpec::from_model("x", "INT", "", "low", ""),
            Err(ModelError::BadBound { .. })
        ));
        let p = PropertySpec::from_model("x", "double", "readonly", "", " 5 ").unwrap();
        assert_eq!(p.maximum, Some(5.0));
        assert_eq!(p.access, AccessMode::ReadOnly);
    }

    #[test]
    fn values_print_as_twin_strings() {
        assert_eq!(Value::Double(21.5).to_string(), "21.5");
        assert_eq!(Value::Float(1500.5).to_string(), "1500.5");
        assert_eq!(Value::Bytes(vec![1, 2]).to_string(), "AQI=");
        assert_eq!(Value::Boolean(true).to_string(), "true");
    }
}
