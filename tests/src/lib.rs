//! The conformance suite: one set of checks, written once, that every
//! [`ModelRuntime`] backend must pass against its real engine and a real model.
//!
//! A backend plugs in with a [`Backend`] description and one line,
//! `conformance::suite!(path::to::backend_fn);`, in `tests/<backend>.rs`. Each
//! check group becomes one test, so `cargo xtask test-backends` can print a
//! backend-by-check table. Run the tests one at a time (`--test-threads=1`):
//! the leak checks look for *any* engine process left behind.
//!
//! The engine and model paths come from environment variables that
//! `cargo xtask test-backends` sets after provisioning them; run without them,
//! every check fails with a message naming that command.

pub mod backends;
pub mod checks;
pub mod gateway;
pub mod harness;
pub mod identity;
pub mod log_capture;
pub mod procs;
pub mod serve;
pub mod wire;
pub mod workload;

use std::path::PathBuf;
use std::time::Duration;

use runtime_core::{ModelRuntime, RuntimeConfig};

/// The variable holding the GGUF model the suite runs on.
pub const MODEL_ENV: &str = "MODEL_RUNTIME_TEST_GGUF";

/// One backend under test.
#[derive(Debug, Clone)]
pub struct Backend {
    /// The backend's name (`llamacpp`), as `hold-runtime` takes it.
    pub name: &'static str,
    /// A fresh, uninitialized runtime.
    pub new_runtime: fn() -> Box<dyn ModelRuntime>,
    /// A configuration for the real model.
    pub config: RuntimeConfig,
    /// The engine process, for server backends.
    pub server: Option<EngineProcess>,
    /// How long a start may take here, for the timing assertions of the faults.
    pub start_budget: Duration,
    /// How long every engine process may take to go once its owner is gone.
    pub exit_budget: Duration,
    /// A misspelled option of this backend and the key it should have been.
    pub misspelled_option: (&'static str, &'static str),
    /// How many streamed requests `gateway_load` sends (16 at a time, a
    /// quarter abandoned): 200, or fewer for an engine whose decode is slow
    /// enough that 200 would take minutes without testing more.
    pub load_requests: usize,
    /// How to ask the engine how many generations it is running.
    pub activity: Activity,
    /// A certificate (PEM) the checks' own HTTP clients trust, for a
    /// backend reached over TLS with a private certificate.
    pub trusted_certificate: Option<String>,
    /// The `hold-runtime` helper binary; [`suite!`] fills it in.
    pub hold_runtime: Option<&'static str>,
    /// The engine the suite's sharing checks run on; [`harness::run`] sets it.
    pub shared: Option<std::sync::Arc<harness::SharedEngine>>,
}

/// What the suite knows about a server backend's engine process.
#[derive(Debug, Clone)]
pub struct EngineProcess {
    /// The engine binary: any process running it is this suite's.
    pub binary: PathBuf,
    /// Where the engine's version can be read independently of the runtime.
    pub version_source: VersionSource,
    /// Command-line fragments of the engine's helper processes, which may
    /// rename themselves (vLLM's `VLLM::EngineCore`).
    pub process_markers: &'static [&'static str],
    /// The command line the runtime would launch for `config` on `port`,
    /// for benchmarks that start the engine without the runtime.
    pub command: fn(&RuntimeConfig, u16) -> runtime_process::ServerCommand,
}

/// Where an engine says how many generations it is running, so checks can
/// verify inside the engine that a generation really stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// llama-server's `GET /slots`: slots with `is_processing`.
    Slots,
    /// vLLM's `GET /metrics`: the `vllm:num_requests_running` gauge.
    VllmMetrics,
    /// candle's `GET /metrics`: the `candle_generations_active` gauge.
    CandleMetrics,
    /// Our gateway's `GET /metrics`: the `gateway_requests_in_flight` gauge.
    GatewayMetrics,
}

/// An independent source of an engine's version, to check `metadata().version`.
#[derive(Debug, Clone, Copy)]
pub enum VersionSource {
    /// `BINARY --version` prints it (llama-server, on stderr).
    VersionFlag,
    /// `GET /version` answers `{"version": ...}` (vLLM).
    HttpVersion,
}

/// The bearer token for `runtime`'s own endpoint (empty if it needs none).
pub fn bearer(runtime: &dyn ModelRuntime) -> String {
    runtime
        .api_key()
        .map(|key| key.expose().to_owned())
        .unwrap_or_default()
}

/// The value of `var`, or a panic that says how to run the suite.
pub fn required_env(var: &str) -> PathBuf {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(value) => PathBuf::from(value),
        None => panic!(
            "${var} is not set: the conformance suite runs against real engines and models. \
             Run it with `cargo xtask test-backends`, which provisions them and sets ${var}."
        ),
    }
}

/// The longest any one check may run.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(900);

/// The variable naming the file where checks record that they do not apply
/// to the backend under test; `cargo xtask test-backends` sets it and shows
/// those checks as `n/a`.
pub const NOT_APPLICABLE_ENV: &str = "CONFORMANCE_NOT_APPLICABLE";

/// Records that `check` does not apply to `backend` (and why), so the table
/// says `n/a` rather than `ok`.
pub fn not_applicable(backend: &Backend, check: &str, why: &str) {
    tracing::info!(backend = backend.name, check, why, "not applicable");
    let Some(path) = std::env::var_os(NOT_APPLICABLE_ENV) else {
        return;
    };
    use std::io::Write;
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| writeln!(file, "{check}\t{why}"));
    if let Err(err) = written {
        panic!(
            "recording that {check} is n/a in {}: {err}",
            path.to_string_lossy()
        );
    }
}

/// The `main` of a conformance suite: every check of [`checks::CONFORMANCE`]
/// against the backend that `$backend()` returns, through [`harness::run`].
/// The suite's test target sets `harness = false`.
#[macro_export]
macro_rules! suite {
    ($backend:path) => {
        fn main() -> ::std::process::ExitCode {
            $crate::harness::run(
                $backend,
                env!("CARGO_BIN_EXE_hold-runtime"),
                $crate::checks::CONFORMANCE,
            )
        }
    };
}

/// Logs to the test's output as `RUST_LOG` says (engine logs with
/// `RUST_LOG=runtime_process::engine=debug`), and everything at debug level
/// to [`log_capture`].
pub fn init_tracing() {
    // The workspace builds reqwest with provider-less rustls (runtime-remote's
    // TLS): plain reqwest clients in the suite need a process-wide provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, filter::LevelFilter};
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(EnvFilter::from_default_env()),
        )
        .with(log_capture::CaptureLayer.with_filter(LevelFilter::DEBUG))
        .try_init();
}
