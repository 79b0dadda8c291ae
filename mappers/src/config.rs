//! Reading KubeEdge's free-form `configData` maps.
//!
//! A Device's protocol and visitor `configData` are free-form JSON. Numbers
//! sometimes arrive as strings (`"1502"`) and flags as `"true"`, so the
//! accessors here take either, and name the key and what was found when
//! neither fits.

use serde_json::{Map, Value as Json};

/// A `configData` map that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The configData is not a JSON object.
    #[error("configData must be an object, found {0}")]
    NotAnObject(String),
    /// A required key is absent.
    #[error("configData: {0} is required")]
    Missing(&'static str),
    /// A key holds something of the wrong kind.
    #[error("configData: {key} must be {expected}, found {found}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What it should hold.
        expected: &'static str,
        /// What it holds.
        found: String,
    },
}

/// A borrowed configData object with typed accessors.
#[derive(Debug, Clone, Copy)]
pub struct ConfigData<'a> {
    map: &'a Map<String, Json>,
}

impl<'a> ConfigData<'a> {
    /// Wraps a JSON value that must be an object.
    pub fn new(value: &'a Json) -> Result<Self, ConfigError> {
        match value {
            Json::Object(map) => Ok(Self { map }),
            other => Err(ConfigError::NotAnObject(short(other))),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Json> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A string value.
    pub fn string(&self, key: &'static str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(invalid(key, "a string", other)),
        }
    }

    /// A required string value.
    pub fn required_string(&self, key: &'static str) -> Result<&'a str, ConfigError> {
        self.string(key)?.ok_or(ConfigError::Missing(key))
    }

    /// A number, given as a JSON number or a numeric string.
    pub fn f64(&self, key: &'static str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Json::Number(n)) => n
                .as_f64()
                .map(Some)
                .ok_or_else(|| invalid(key, "a number", &Json::Number(n.clone()))),
            Some(Json::String(s)) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(Some)
                .ok_or_else(|| invalid(key, "a number", &Json::String(s.clone()))),
            Some(other) => Err(invalid(key, "a number", other)),
        }
    }

    /// A non-negative integer that fits `u64`.
    pub fn u64(&self, key: &'static str) -> Result<Option<u64>, ConfigError> {
        let raw = self.get(key);
        match self.f64(key)? {
            None => Ok(None),
            Some(v) if v >= 0.0 && v.fract() == 0.0 && v <= u64::MAX as f64 =>
            {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                Ok(Some(v as u64))
            }
            Some(_) => Err(invalid(
                key,
                "a non-negative integer",
                raw.unwrap_or(&Json::Null),
            )),
        }
    }

    /// An integer in `0..=max`.
    pub fn bounded(&self, key: &'static str, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.u64(key)? {
            Some(v) if v > max => Err(ConfigError::Invalid {
                key,
                expected: "within range",
                found: format!("{v} (at most {max})"),
            }),
            other => Ok(other),
        }
    }

    /// A flag, given as a JSON bool or `"true"`/`"false"`.
    pub fn bool(&self, key: &'static str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Json::Bool(b)) => Ok(Some(*b)),
            Some(Json::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(Json::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(other) => Err(invalid(key, "true or false", other)),
        }
    }
}

fn invalid(key: &'static str, expected: &'static str, found: &Json) -> ConfigError {
    ConfigError::Invalid {
        key,
        expected,
        found: short(found),
    }
}

fn short(value: &Json) -> String {
    let mut text = value.to_string();
    if text.len() > 64 {
        let mut cut = 64;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_and_flags_may_be_strings() {
        let v = json!({"port": "1502", "slaveID": 1, "isSwap": "true", "scale": 0.1, "x": [1]});
        let c = ConfigData::new(&v).unwrap();
        assert_eq!(c.u64("port").unwrap(), Some(1502));
        assert_eq!(c.u64("slaveID").unwrap(), Some(1));
        assert_eq!(c.bool("isSwap").unwrap(), Some(true));
        assert_eq!(c.f64("scale").unwrap(), Some(0.1));
        assert!(c.u64("scale").is_err());
        assert!(c.string("x").is_err());
        assert!(c.bounded("port", 255).is_err());
        assert_eq!(c.required_string("ip"), Err(ConfigError::Missing("ip")));
        assert!(ConfigData::new(&json!([1])).is_err());
    }
}
