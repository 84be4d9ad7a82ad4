//! Reading a JSON object the way Go's `encoding/json` matches field names
//! (case-insensitively), but strict: unknown and duplicate fields are errors.

use crate::ConfigError;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// The fields of one JSON object, keyed by their canonical names.
pub(crate) struct Fields {
    path: &'static str,
    values: HashMap<&'static str, Value>,
}

impl Fields {
    /// `path` prefixes field names in errors (`""` or `"Backend."`);
    /// `known` lists the canonical names; `known_text` is shown to the user.
    pub(crate) fn new(
        object: Map<String, Value>,
        path: &'static str,
        known: &'static [&'static str],
        known_text: &'static str,
    ) -> Result<Self, ConfigError> {
        let mut values = HashMap::new();
        for (name, value) in object {
            let canonical = known
                .iter()
                .find(|k| k.eq_ignore_ascii_case(&name))
                .ok_or_else(|| ConfigError::UnknownField {
                    field: format!("{path}{name}"),
                    known: known_text,
                })?;
            if values.insert(*canonical, value).is_some() {
                return Err(ConfigError::DuplicateField {
                    field: format!("{path}{canonical}"),
                });
            }
        }
        Ok(Fields { path, values })
    }

    fn name(&self, field: &str) -> String {
        format!("{}{}", self.path, field)
    }

    fn err(&self, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::field(self.name(field), reason)
    }

    /// A field's value; JSON `null` counts as absent, as in Go.
    pub(crate) fn take(&mut self, field: &'static str) -> Option<Value> {
        self.values.remove(field).filter(|v| !v.is_null())
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<Option<bool>, ConfigError> {
        match self.take(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(self.err(field, format!("expected true or false, got {other}"))),
        }
    }

    pub(crate) fn uint(
        &mut self,
        field: &'static str,
        max: u64,
    ) -> Result<Option<u64>, ConfigError> {
        match self.take(field) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v <= max => Ok(Some(v)),
                _ => Err(self.err(
                    field,
                    format!("expected a whole number from 0 to {max}, got {n}"),
                )),
            },
            Some(other) => Err(self.err(field, format!("expected a number, got {other}"))),
        }
    }

    pub(crate) fn string(&mut self, field: &'static str) -> Result<Option<String>, ConfigError> {
        match self.take(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.err(field, format!("expected a string, got {other}"))),
        }
    }

    /// A string field read by `parse`; `None` from it is an error naming
    /// `expected`.
    pub(crate) fn parsed_with<T>(
        &mut self,
        field: &'static str,
        expected: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        match self.string(field)? {
            None => Ok(None),
            Some(s) => parse(s.trim())
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected {expected}, got {s:?}"))),
        }
    }

    /// A string field parsed with `FromStr`, the error naming what was expected.
    pub(crate) fn parsed<T: std::str::FromStr>(
        &mut self,
        field: &'static str,
        expected: &str,
    ) -> Result<Option<T>, ConfigError> {
        match self.string(field)? {
            None => Ok(None),
            Some(s) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| self.err(field, format!("expected {expected}, got {s:?}"))),
        }
    }
}
