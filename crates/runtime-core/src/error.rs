//! The one error type every runtime returns.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A boxed error from a lower layer (HTTP, I/O in a backend, a numeric library).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while starting, using or stopping a runtime.
///
/// Variants are meant to be matched on: each says what failed and carries what a
/// caller needs to act (which field, which binary, the engine's last log lines).
/// Messages are short; the underlying cause, where there is one, is chained as
/// [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A [`RuntimeConfig`](crate::RuntimeConfig) field has a value the backend cannot use.
    #[error("invalid configuration: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field (`context_size`, `extra_config.queue`).
        field: Cow<'static, str>,
        /// What is wrong with it and what would be accepted.
        reason: String,
    },

    /// An [`InferenceRequest`](crate::InferenceRequest) field is out of range or missing.
    #[error("invalid request: `{field}` {reason}")]
    InvalidRequest {
        /// The offending field (`messages`, `temperature`, `n`).
        field: Cow<'static, str>,
        /// What is wrong with it and what would be accepted.
        reason: String,
    },

    /// The model path does not exist.
    #[error("model not found at {}", path.display())]
    ModelNotFound {
        /// The path that was looked at.
        path: PathBuf,
    },

    /// The model exists but its content is not a usable model (random bytes,
    /// an empty file, a directory without weights).
    #[error("{} is not a usable model: {reason}", path.display())]
    InvalidModel {
        /// The model path.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },

    /// The model is of a format this backend does not take.
    #[error("{backend} does not take {found} models (it takes {expected})")]
    UnsupportedFormat {
        /// The backend that refused the model.
        backend: &'static str,
        /// The formats the backend takes.
        expected: String,
        /// The format that was found.
        found: String,
    },

    /// The engine binary could not be found.
    #[error("{binary} not found: {hint}")]
    BinaryNotFound {
        /// The binary that was looked for.
        binary: String,
        /// Where it was looked for and how to install or point at it.
        hint: String,
    },

    /// The engine process could not be started.
    #[error("error spawning {binary}")]
    Spawn {
        /// The program that failed to start.
        binary: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The engine did not become ready before the startup deadline.
    #[error("{engine} not ready after {:.1}s{}", elapsed.as_secs_f64(), LastLine(log_tail))]
    StartupTimeout {
        /// The engine's name.
        engine: String,
        /// How long initialization waited.
        elapsed: Duration,
        /// The engine's most recent log lines, oldest first.
        log_tail: Vec<String>,
    },

    /// The engine process exited: during startup, or while serving.
    #[error("{engine} exited ({status}){}", LastLine(log_tail))]
    EngineExited {
        /// The engine's name.
        engine: String,
        /// The exit status as the operating system reported it.
        status: String,
        /// The engine's most recent log lines, oldest first.
        log_tail: Vec<String>,
    },

    /// The engine stopped answering: its health probe went unanswered for
    /// longer than [`hang_timeout`](crate::RuntimeConfig::hang_timeout) while
    /// the request waited (the process is alive but hung, stopped or
    /// overwhelmed).
    #[error("{engine} has not answered a health probe for {:.1}s", silent_for.as_secs_f64())]
    EngineUnresponsive {
        /// The engine's name.
        engine: String,
        /// How long it has not answered.
        silent_for: Duration,
    },

    /// A method that needs a running engine was called before
    /// [`initialize`](crate::ModelRuntime::initialize) or after
    /// [`shutdown`](crate::ModelRuntime::shutdown).
    #[error("runtime is not initialized; call initialize first")]
    NotInitialized,

    /// [`initialize`](crate::ModelRuntime::initialize) was called on a runtime that
    /// is already running.
    #[error("runtime is already initialized; call shutdown before initializing again")]
    AlreadyInitialized,

    /// The request does not fit in the model's context window.
    #[error("prompt of {prompt_tokens} tokens does not fit the context of {context_size} tokens")]
    ContextExceeded {
        /// Tokens in the prompt (as far as the engine said).
        prompt_tokens: u64,
        /// The effective context size.
        context_size: u64,
    },

    /// The runtime (or the model it serves) does not do what was asked:
    /// `what` names it (`tokenize`, `embeddings`).
    #[error("{what} is not served by {by}")]
    Unsupported {
        /// What was asked for.
        what: Cow<'static, str>,
        /// What does not serve it (a backend, a model).
        by: String,
    },

    /// The request names a model that is not served here.
    #[error("model `{requested}` is not served here; available: {}", available.join(", "))]
    ModelNotServed {
        /// The name the request asked for.
        requested: String,
        /// The names that are served.
        available: Vec<String>,
    },

    /// The model is served here but cannot answer now: its engine failed to
    /// start, crashed and waits to be restarted, or there is no room to load
    /// it. `reason` is meant for the client (no engine log text).
    #[error("model `{model}` is unavailable: {reason}")]
    ModelUnavailable {
        /// The model's name.
        model: String,
        /// Why, in a sentence a client may see.
        reason: String,
        /// When trying again makes sense, if known.
        retry_after: Option<Duration>,
    },

    /// The runtime was shut down while this request was in flight.
    #[error("runtime was shut down while the request was in flight")]
    ShutDown,

    /// The engine is at capacity and refused to queue the request.
    #[error("engine is busy: {0}")]
    Busy(String),

    /// The engine answered with an error status.
    #[error("engine answered HTTP {status}: {message}")]
    Api {
        /// The HTTP status code.
        status: u16,
        /// The engine's error type (`invalid_request_error`, `BadRequestError`, ...), if given.
        kind: Option<String>,
        /// The engine's error message.
        message: String,
    },

    /// Talking to the engine failed (connection refused, reset, timed out).
    #[error("error talking to the engine")]
    Transport(#[source] BoxError),

    /// The engine's stream broke its protocol (a malformed event, an error event).
    #[error("malformed stream from the engine: {0}")]
    StreamProtocol(String),

    /// The model's answer is not what the request demanded: text that is
    /// not valid against its `json_schema`, not a JSON object, or a tool
    /// call whose arguments do not follow the tool's parameters. Never
    /// returned as a success: the schema was enforced during generation, so
    /// this means the engine broke its promise (or the answer was cut off
    /// by `max_tokens`).
    #[error("the answer is invalid: {what} {reason}")]
    OutputInvalid {
        /// What was checked (`the answer`, `the arguments of get_weather`).
        what: String,
        /// The first violation, with where in the answer it is.
        reason: String,
    },

    /// The in-process engine failed (loading weights, a tensor operation).
    #[error("{context}")]
    Engine {
        /// What was being done.
        context: String,
        /// The underlying failure.
        #[source]
        source: BoxError,
    },

    /// A file-system or other local I/O operation failed.
    #[error("{context}")]
    Io {
        /// What was being done, with the path involved.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Builds [`Error::InvalidConfig`].
    pub fn invalid_config(field: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Builds [`Error::Unsupported`].
    pub fn unsupported(what: impl Into<Cow<'static, str>>, by: impl Into<String>) -> Self {
        Self::Unsupported {
            what: what.into(),
            by: by.into(),
        }
    }

    /// Builds [`Error::OutputInvalid`].
    pub fn output_invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::OutputInvalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Builds [`Error::InvalidRequest`].
    pub fn invalid_request(field: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> Self {
        Self::InvalidRequest {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The [`Error::InvalidConfig`] for a configured `port` that another
    /// process already listens on: found before an engine is started, so the
    /// engine's start (a minute for some) is not spent to learn it.
    pub fn port_in_use(host: &str, port: u16) -> Self {
        Self::invalid_config(
            "port",
            format!(
                "is {port}, which another process already listens on at {host}; choose \
                 another port, or 0 for a free one"
            ),
        )
    }

    /// Builds [`Error::Io`] with a description of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Builds [`Error::Engine`] from any error of an in-process engine.
    pub fn engine(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Engine {
            context: context.into(),
            source: source.into(),
        }
    }

    /// The engine's recent log lines, when the error carries them.
    pub fn log_tail(&self) -> &[String] {
        match self {
            Self::StartupTimeout { log_tail, .. } | Self::EngineExited { log_tail, .. } => log_tail,
            _ => &[],
        }
    }

    /// What kind of failure this is: the one table that the HTTP status, the
    /// client/server split, the wire's error type and metric labels derive
    /// from.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidRequest { .. } | Self::ContextExceeded { .. } => ErrorKind::InvalidRequest,
            Self::ModelNotServed { .. } => ErrorKind::NotFound,
            Self::Unsupported { .. } => ErrorKind::Unsupported,
            Self::Busy(_) => ErrorKind::Busy,
            Self::NotInitialized | Self::ShutDown | Self::ModelUnavailable { .. } => {
                ErrorKind::Unavailable
            }
            Self::EngineExited { .. }
            | Self::EngineUnresponsive { .. }
            | Self::Transport(_)
            | Self::StreamProtocol(_)
            | Self::OutputInvalid { .. } => ErrorKind::EngineFailed,
            Self::Api { status, .. } => ErrorKind::of_engine_status(*status),
            Self::InvalidConfig { .. }
            | Self::ModelNotFound { .. }
            | Self::InvalidModel { .. }
            | Self::UnsupportedFormat { .. }
            | Self::BinaryNotFound { .. }
            | Self::Spawn { .. }
            | Self::StartupTimeout { .. }
            | Self::AlreadyInitialized
            | Self::Engine { .. }
            | Self::Io { .. } => ErrorKind::Internal,
        }
    }

    /// A short code a client can act on (`engine_exited`, `model_not_found`,
    /// `busy`): the wire's `code` and a metric label, finer than
    /// [`kind`](Self::kind).
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "invalid_request",
            Self::ContextExceeded { .. } => "context_exceeded",
            Self::ModelNotServed { .. } => "model_not_found",
            Self::Unsupported { .. } => "unsupported",
            Self::Busy(_) => "busy",
            Self::NotInitialized => "not_ready",
            Self::ShutDown => "shutting_down",
            Self::ModelUnavailable { .. } => "model_unavailable",
            Self::EngineExited { .. } => "engine_exited",
            Self::EngineUnresponsive { .. } => "engine_unresponsive",
            Self::OutputInvalid { .. } => "output_invalid",
            Self::Transport(_) | Self::StreamProtocol(_) | Self::Api { .. } => "engine_error",
            _ => "internal_error",
        }
    }

    /// The HTTP status a server answers the error with: its
    /// [`kind`](Self::kind)'s, except that an engine's own HTTP error keeps
    /// the engine's exact status.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Api { status, .. } if (400..600).contains(status) => *status,
            _ => self.kind().http_status(),
        }
    }

    /// Whether the error means the caller sent something wrong (a 4xx in
    /// HTTP terms) rather than the server or the engine failing.
    pub fn is_client_error(&self) -> bool {
        self.kind().is_client_error()
    }

    /// The message followed by each of its sources, `: `-separated, on one
    /// line: what a log line or a terminal shows of an error.
    pub fn with_sources(&self) -> impl fmt::Display + '_ {
        WithSources(self)
    }
}

/// What kind of failure an [`Error`] is ([`Error::kind`]), and what follows
/// from the kind: the HTTP status a server answers it with, whether the
/// client is to blame, the label metrics count it under.
///
/// ```
/// use runtime_core::{Error, ErrorKind};
///
/// let err = Error::invalid_request("temperature", "must be between 0 and 2");
/// assert_eq!(err.kind(), ErrorKind::InvalidRequest);
/// assert_eq!(err.kind().http_status(), 400);
/// assert!(err.is_client_error());
/// assert_eq!(Error::Busy("full".into()).kind().http_status(), 429);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request is malformed, out of range, or too long for the context.
    InvalidRequest,
    /// The request's credentials were refused.
    Unauthorized,
    /// The request names a model (or another thing) not served here.
    NotFound,
    /// Too much at once: the same request later may succeed.
    Busy,
    /// What the request asks for is not implemented here.
    Unsupported,
    /// The model cannot serve now: loading, failed, restarting, shutting down.
    Unavailable,
    /// The engine failed while serving: it exited, hangs, broke its
    /// protocol, or answered with a server error.
    EngineFailed,
    /// A failure of our own: configuration, local I/O, an in-process engine.
    Internal,
}

impl ErrorKind {
    /// The HTTP status a server answers with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidRequest => 400,
            Self::Unauthorized => 401,
            Self::NotFound => 404,
            Self::Busy => 429,
            Self::Internal => 500,
            Self::Unsupported => 501,
            Self::EngineFailed => 502,
            Self::Unavailable => 503,
        }
    }

    /// Whether the client is to blame (a 4xx status).
    pub fn is_client_error(self) -> bool {
        (400..500).contains(&self.http_status())
    }

    /// The kind's name, for metric labels and logs (`invalid_request`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not_found",
            Self::Busy => "busy",
            Self::Unsupported => "unsupported",
            Self::Unavailable => "unavailable",
            Self::EngineFailed => "engine_failed",
            Self::Internal => "internal",
        }
    }

    /// The kind of an engine's HTTP error status, as it would mean it for
    /// our own clients: its 4xx are the request's fault, its 5xx its own.
    pub fn of_engine_status(status: u16) -> Self {
        match status {
            401 | 403 => Self::Unauthorized,
            404 => Self::NotFound,
            429 => Self::Busy,
            501 => Self::Unsupported,
            503 => Self::Unavailable,
            400..=499 => Self::InvalidRequest,
            _ => Self::EngineFailed,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// See [`Error::with_sources`].
struct WithSources<'a>(&'a Error);

impl fmt::Display for WithSources<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(self.0);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// Shows the last non-empty log line after an error message, if there is one.
struct LastLine<'a>(&'a [String]);

impl fmt::Display for LastLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.iter().rev().find(|line| !line.trim().is_empty()) {
            Some(line) => write!(f, "; last log line: {}", line.trim()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_exit_message_names_the_last_log_line() {
        let err = Error::EngineExited {
            engine: "llama-server".into(),
            status: "exit status: 1".into(),
            log_tail: vec![
                "loading".into(),
                "failed to open GGUF file".into(),
                "".into(),
            ],
        };
        assert_eq!(
            err.to_string(),
            "llama-server exited (exit status: 1); last log line: failed to open GGUF file"
        );
        assert_eq!(err.log_tail().len(), 3);
    }

    #[test]
    fn spawn_error_chains_its_cause_without_repeating_it() {
        let err = Error::Spawn {
            binary: "llama-server".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert_eq!(err.to_string(), "error spawning llama-server");
        let source = std::error::Error::source(&err).expect("source is chained");
        assert_eq!(source.to_string(), "permission denied");
        assert_eq!(
            err.with_sources().to_string(),
            "error spawning llama-server: permission denied"
        );
    }

    #[test]
    fn every_kind_has_one_status_and_client_errors_are_the_4xx_ones() {
        let kinds = [
            ErrorKind::InvalidRequest,
            ErrorKind::Unauthorized,
            ErrorKind::NotFound,
            ErrorKind::Busy,
            ErrorKind::Unsupported,
            ErrorKind::Unavailable,
            ErrorKind::EngineFailed,
            ErrorKind::Internal,
        ];
        let statuses: std::collections::HashSet<u16> =
            kinds.iter().map(|k| k.http_status()).collect();
        assert_eq!(statuses.len(), kinds.len(), "one status per kind");
        for kind in kinds {
            assert_eq!(kind.is_client_error(), kind.http_status() < 500, "{kind}");
        }
        // The router and the gateway's metrics once disagreed on these two.
        let not_served = Error::ModelNotServed {
            requested: "x".into(),
            available: Vec::new(),
        };
        assert_eq!(not_served.kind().http_status(), 404);
        assert!(not_served.is_client_error());
        assert_eq!(Error::Busy("full".into()).kind().http_status(), 429);
        assert!(Error::Busy("full".into()).is_client_error());
    }

    #[test]
    fn an_engines_status_keeps_its_meaning() {
        for (status, kind) in [
            (400, ErrorKind::InvalidRequest),
            (401, ErrorKind::Unauthorized),
            (404, ErrorKind::NotFound),
            (413, ErrorKind::InvalidRequest),
            (429, ErrorKind::Busy),
            (500, ErrorKind::EngineFailed),
            (503, ErrorKind::Unavailable),
        ] {
            let err = Error::Api {
                status,
                kind: None,
                message: String::new(),
            };
            assert_eq!(err.kind(), kind, "{status}");
        }
    }

    #[test]
    fn api_errors_in_the_4xx_range_are_client_errors() {
        let api = |status| Error::Api {
            status,
            kind: None,
            message: String::new(),
        };
        assert!(api(400).is_client_error());
        assert!(!api(500).is_client_error());
        assert!(!Error::NotInitialized.is_client_error());
    }
}
