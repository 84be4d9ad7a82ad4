use thiserror::Error;

/// Why a network configuration was rejected. Every variant names the field
/// at fault so an operator can fix the config without reading code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// The text is not JSON, or not a JSON object.
    #[error("config is not a valid JSON object: {0}")]
    Syntax(String),
    /// A field weft does not know (or does not support).
    #[error("unknown field {field:?} (known fields: {known})")]
    UnknownField { field: String, known: &'static str },
    /// The same field given twice, e.g. `Network` and `network`.
    #[error("field {field:?} is given more than once")]
    DuplicateField { field: String },
    /// A field whose value is malformed or fails validation.
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
}

impl ConfigError {
    pub(crate) fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Field {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The field at fault, when there is one.
    pub fn field_name(&self) -> Option<&str> {
        match self {
            ConfigError::Syntax(_) => None,
            ConfigError::UnknownField { field, .. } | ConfigError::DuplicateField { field } => {
                Some(field)
            }
            ConfigError::Field { field, .. } => Some(field),
        }
    }
}
