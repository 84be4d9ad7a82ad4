//! Errors that end a wait at once.
//!
//! Waits poll: a controller still starting, a route not programmed yet. Some
//! failures no amount of polling fixes (a binary not built, a tool not
//! installed, a config the controller refused, a process that exited); a
//! wait that meets one stops and reports it instead of timing out later with
//! a message about something else.

use std::fmt;

/// A failure that retrying cannot fix.
#[derive(Debug)]
pub struct Unretryable(pub String);

impl fmt::Display for Unretryable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unretryable {}

/// An [`Unretryable`] error with this message.
pub fn unretryable(message: impl Into<String>) -> anyhow::Error {
    Unretryable(message.into()).into()
}

/// Whether `e`, or anything it wraps, is [`Unretryable`].
pub fn is_unretryable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Unretryable>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn found_through_context() {
        let e = Err::<(), _>(unretryable("weftctl is not built"))
            .context("starting the lab")
            .unwrap_err();
        assert!(is_unretryable(&e));
        assert_eq!(format!("{e:#}"), "starting the lab: weftctl is not built");
        assert!(!is_unretryable(&anyhow::anyhow!("connection refused")));
    }
}
