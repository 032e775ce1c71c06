//! The one error type the library returns to `main`. Client misbehaviour is never an `Error`:
//! it ends that client's connection and is logged there.

use std::fmt;
use std::io;

use crate::config::ConfigError;

#[derive(Debug)]
pub enum Error {
    /// A flag or flag combination is invalid (exit status 2).
    Config(ConfigError),
    /// The server could not start or keep running; `what` says which step failed.
    Io {
        what: &'static str,
        source: io::Error,
    },
    /// A thread the server cannot run without panicked (see `supervisor`); the server shut
    /// itself down.
    Failed { thread: &'static str },
}

impl Error {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { what, source }
    }

    /// The process exit status `main` uses for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 2,
            Error::Io { .. } | Error::Failed { .. } => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(err) => err.fmt(f),
            Error::Io { what, source } => write!(f, "{what}: {source}"),
            Error::Failed { thread } => write!(
                f,
                "the {thread} thread panicked, so the server shut down (see the log above)"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config(err) => Some(err),
            Error::Io { source, .. } => Some(source),
            Error::Failed { .. } => None,
        }
    }
}

impl From<ConfigError> for Error {
    fn from(err: ConfigError) -> Error {
        Error::Config(err)
    }
}
