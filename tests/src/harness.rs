//! The conformance suites' test harness: every check of one backend in one
//! process and one async runtime, so the checks that only need *a* running
//! engine share one, and the checks about starting, stopping and faults
//! start their own.
//!
//! A vLLM start costs 30 to 60 s here; with a start per check the vLLM suite
//! spent most of its time starting engines. Which checks share is declared
//! in [`Check::shares_engine`], next to the check, not decided by the check.
//!
//! The harness is libtest-mimic's: `--list`, name filters, `--exact` and
//! `--test-threads` work as with libtest, and results print as `test NAME
//! ... ok`, which is what `cargo xtask test-backends` reads. Checks always
//! run one at a time (the leak checks look for *any* engine process).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

use futures::FutureExt;
use libtest_mimic::{Arguments, Failed, Trial};
use runtime_core::ModelRuntime;

use crate::{Backend, CHECK_TIMEOUT};

/// A check's body: runs against `backend`, panics to fail.
pub type CheckFn = fn(Arc<Backend>) -> Pin<Box<dyn Future<Output = ()>>>;

/// One declared check of a suite.
#[derive(Clone, Copy)]
pub struct Check {
    /// The check's name, as the table shows it.
    pub name: &'static str,
    /// Whether it runs on the suite's shared engine ([`shared_runtime`])
    /// rather than starting its own.
    pub shares_engine: bool,
    /// The check.
    pub run: CheckFn,
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Check")
            .field("name", &self.name)
            .field("shares_engine", &self.shares_engine)
            .finish_non_exhaustive()
    }
}

/// Declares a [`Check`] for an `async fn(&Backend)` of [`crate::checks`]:
/// `check!(generation, shared)` or `check!(lifecycle, own)`.
#[macro_export]
macro_rules! check {
    ($name:ident, shared) => {
        $crate::check!(@make $name, true)
    };
    ($name:ident, own) => {
        $crate::check!(@make $name, false)
    };
    (@make $name:ident, $shares:expr) => {
        $crate::harness::Check {
            name: stringify!($name),
            shares_engine: $shares,
            run: |backend| {
                ::std::boxed::Box::pin(async move { $crate::checks::$name(&backend).await })
            },
        }
    };
}

/// The engine the sharing checks of one suite run on: started by the first
/// of them, shut down when the suite ends (or taken by the last of them,
/// which ends it: [`take_shared_runtime`]).
pub struct SharedEngine {
    runtime: tokio::sync::Mutex<Option<SharedRuntime>>,
    /// The process groups of the shared engine, which the leak check after
    /// each check does not count.
    groups: std::sync::Mutex<Vec<i32>>,
    /// The API key the shared engine is started with, which the `secrets`
    /// check looks for where it must never be.
    key: String,
}

impl Default for SharedEngine {
    fn default() -> Self {
        Self {
            runtime: tokio::sync::Mutex::new(None),
            groups: std::sync::Mutex::new(Vec::new()),
            key: format!("shared-engine-sentinel-key-{}", std::process::id()),
        }
    }
}

impl std::fmt::Debug for SharedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedEngine")
            .field("groups", &self.groups())
            .finish_non_exhaustive()
    }
}

impl SharedEngine {
    /// The process groups the shared engine runs in (none before it starts,
    /// or for an in-process engine).
    pub fn groups(&self) -> Vec<i32> {
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The key the shared engine requires.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// The shared engine, as the checks that share it hold it: a
/// [`ModelRuntime`] (through `Deref`) that stays up after they return.
#[derive(Clone)]
pub struct SharedRuntime(Arc<Box<dyn ModelRuntime>>);

impl std::ops::Deref for SharedRuntime {
    type Target = dyn ModelRuntime;

    fn deref(&self) -> &Self::Target {
        &**self.0
    }
}

impl std::fmt::Debug for SharedRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRuntime")
            .field("base_url", &self.0.base_url())
            .finish()
    }
}

fn shared_engine(backend: &Backend) -> &SharedEngine {
    backend.shared.as_ref().expect(
        "the check is declared `shared` (only the harness's backends have an engine to share)",
    )
}

/// The suite's shared engine for `backend`, started on first use with the
/// backend's configuration and the shared key ([`SharedEngine::key`]),
/// with everything logged from then on captured ([`crate::log_capture`]).
/// Only checks declared `shared` may call it: the engine must be idle and
/// healthy when they return.
pub async fn shared_runtime(backend: &Backend) -> SharedRuntime {
    let shared = shared_engine(backend);
    let slot = shared.runtime.lock().await;
    if let Some(runtime) = &*slot {
        return runtime.clone();
    }
    tracing::info!(backend = backend.name, "starting the suite's shared engine");
    Vacancy { backend, slot }
        .fill((backend.new_runtime)())
        .await
        .unwrap_or_else(|err| {
            panic!(
                "{} failed to initialize: {}",
                backend.name,
                crate::checks::chain(&err)
            )
        })
}

/// The shared engine's slot while no engine fills it: whoever holds it may
/// start the shared engine on a runtime of its own ([`Vacancy::fill`]).
///
/// For a check that starts an engine anyway, as `lifecycle` does when it
/// initializes again after a shutdown: that engine becomes the shared one,
/// and the suite starts one engine fewer (30 to 60 s each on vLLM here).
pub struct Vacancy<'a> {
    backend: &'a Backend,
    slot: tokio::sync::MutexGuard<'a, Option<SharedRuntime>>,
}

impl std::fmt::Debug for Vacancy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vacancy")
            .field("backend", &self.backend.name)
            .finish_non_exhaustive()
    }
}

/// The shared engine's slot, if the suite shares an engine and none runs yet.
pub async fn vacancy(backend: &Backend) -> Option<Vacancy<'_>> {
    let slot = backend.shared.as_ref()?.runtime.lock().await;
    slot.is_none().then_some(Vacancy { backend, slot })
}

impl Vacancy<'_> {
    /// Initializes `runtime` as the shared engine is started (the backend's
    /// configuration with the shared key, logs captured from here on) and
    /// makes it the suite's shared engine.
    ///
    /// # Errors
    ///
    /// Whatever `initialize` returns; the slot stays empty.
    pub async fn fill(
        mut self,
        mut runtime: Box<dyn ModelRuntime>,
    ) -> runtime_core::Result<SharedRuntime> {
        let backend = self.backend;
        let shared = shared_engine(backend);
        crate::log_capture::start();
        // An engine we start gets the shared key; a server we attach to
        // keeps its own, which the configuration names.
        let config = match &backend.config.api_key {
            Some(_) => backend.config.clone(),
            None => backend.config.clone().with_api_key(shared.key()),
        };
        runtime.initialize(config).await?;
        if backend.server.is_some() {
            let mut groups: Vec<i32> = crate::checks::engine_processes(backend, runtime.as_ref())
                .iter()
                .map(|p| p.pgid)
                .collect();
            groups.dedup();
            *shared
                .groups
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = groups;
        }
        let runtime = SharedRuntime(Arc::new(runtime));
        *self.slot = Some(runtime.clone());
        Ok(runtime)
    }
}

/// Takes the shared engine for a check that ends it (starting it first if no
/// check did): the last check that shares it. From then on the leak check
/// counts its processes; a later sharing check would start a new one.
pub async fn take_shared_runtime(backend: &Backend) -> Box<dyn ModelRuntime> {
    drop(shared_runtime(backend).await);
    let shared = shared_engine(backend);
    let runtime = shared
        .runtime
        .lock()
        .await
        .take()
        .expect("the shared engine was just started");
    shared
        .groups
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    Arc::try_unwrap(runtime.0)
        .unwrap_or_else(|_| panic!("no other check holds the shared engine while one takes it"))
}

/// A shared engine lent to something that starts and stops its own
/// runtimes (the gateway's factory): `initialize` and `shutdown` do
/// nothing, everything else is the shared engine's.
#[derive(Debug)]
pub struct Lent(pub SharedRuntime);

#[runtime_core::async_trait]
impl ModelRuntime for Lent {
    fn supported_format(&self) -> runtime_core::ModelFormat {
        self.0.supported_format()
    }

    async fn initialize(
        &mut self,
        _config: runtime_core::RuntimeConfig,
    ) -> runtime_core::Result<()> {
        Ok(())
    }

    async fn is_ready(&self) -> bool {
        self.0.is_ready().await
    }

    async fn health_check(&self) -> runtime_core::Result<String> {
        self.0.health_check().await
    }

    fn base_url(&self) -> String {
        self.0.base_url()
    }

    fn api_key(&self) -> Option<runtime_core::ApiKey> {
        self.0.api_key()
    }

    async fn generate(
        &self,
        request: runtime_core::InferenceRequest,
    ) -> runtime_core::Result<runtime_core::InferenceResponse> {
        self.0.generate(request).await
    }

    async fn generate_stream(
        &self,
        request: runtime_core::InferenceRequest,
    ) -> runtime_core::Result<runtime_core::TextStream> {
        self.0.generate_stream(request).await
    }

    async fn generate_events(
        &self,
        request: runtime_core::InferenceRequest,
    ) -> runtime_core::Result<runtime_core::EventStream> {
        self.0.generate_events(request).await
    }

    async fn tokenize(&self, text: &str, add_special: bool) -> runtime_core::Result<Vec<u32>> {
        self.0.tokenize(text, add_special).await
    }

    async fn detokenize(&self, tokens: &[u32]) -> runtime_core::Result<String> {
        self.0.detokenize(tokens).await
    }

    async fn shutdown(&mut self) -> runtime_core::Result<()> {
        Ok(())
    }

    fn metadata(&self) -> runtime_core::RuntimeMetadata {
        self.0.metadata()
    }

    fn resident_memory(&self) -> Option<u64> {
        self.0.resident_memory()
    }

    fn engine_pid(&self) -> Option<u32> {
        self.0.engine_pid()
    }

    fn log_tail(&self) -> Vec<String> {
        self.0.log_tail()
    }
}

/// Runs `checks` against the backend `make_backend` returns, as libtest
/// would, and stops the shared engine at the end (and proves it gone).
#[allow(
    clippy::print_stderr,
    reason = "a test harness reports on stderr, as libtest does"
)]
pub fn run(
    make_backend: fn() -> Backend,
    hold_runtime: &'static str,
    checks: &[Check],
) -> ExitCode {
    crate::init_tracing();
    let mut arguments = Arguments::from_args();
    // One at a time, whatever was asked: the leak checks look for any engine.
    arguments.test_threads = Some(1);
    let async_runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("an async runtime for the suite"),
    );
    let mut backend = make_backend();
    backend.hold_runtime = Some(hold_runtime);
    backend.shared = Some(Arc::new(SharedEngine::default()));
    let backend = Arc::new(backend);

    let trials = checks
        .iter()
        .map(|check| {
            let check = *check;
            let backend = backend.clone();
            let async_runtime = async_runtime.clone();
            Trial::test(check.name, move || {
                async_runtime.block_on(run_check(check, backend))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&arguments, trials);

    // Stop the shared engine (if a check started one) and prove it gone.
    let mut backend = Arc::try_unwrap(backend).expect("no check holds the backend any more");
    let stopped = async_runtime.block_on(stop_shared(&mut backend));
    if let Err(message) = &stopped {
        tracing::error!("{message}");
        eprintln!("error: {message}");
    }
    if conclusion.has_failed() || stopped.is_err() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// One check, bounded by [`CHECK_TIMEOUT`], then the leak check, whatever
/// the check's outcome. A panic fails the check, not the suite.
async fn run_check(check: Check, backend: Arc<Backend>) -> Result<(), Failed> {
    let started = std::time::Instant::now();
    let outcome = run_and_check_leaks(check, backend).await;
    record_time(check.name, started.elapsed());
    outcome
}

/// The variable naming the file where the harness writes how long each
/// check took (`check<TAB>seconds` lines); `cargo xtask test-backends` sets
/// it and names the slowest checks, so the suite's time stays in view.
pub const TIMES_ENV: &str = "CONFORMANCE_TIMES";

fn record_time(check: &str, took: std::time::Duration) {
    tracing::info!(check, took_s = took.as_secs_f64(), "check finished");
    let Some(path) = std::env::var_os(TIMES_ENV) else {
        return;
    };
    use std::io::Write;
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| writeln!(file, "{check}\t{:.1}", took.as_secs_f64()));
    if let Err(err) = written {
        tracing::warn!(error = %err, "could not record the check's time");
    }
}

async fn run_and_check_leaks(check: Check, backend: Arc<Backend>) -> Result<(), Failed> {
    let bound = CHECK_TIMEOUT;
    let outcome = AssertUnwindSafe(tokio::time::timeout(bound, (check.run)(backend.clone())))
        .catch_unwind()
        .await;
    let leak = AssertUnwindSafe(crate::checks::assert_no_engine_left(&backend))
        .catch_unwind()
        .await;
    match (outcome, leak) {
        (Ok(Ok(())), Ok(())) => Ok(()),
        (Ok(Err(_)), _) => Err(Failed::from(format!(
            "{} did not finish within {bound:?}",
            check.name
        ))),
        (Err(payload), _) | (Ok(Ok(())), Err(payload)) => {
            Err(Failed::from(panic_message(&*payload)))
        }
    }
}

/// The message a check panicked with.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "the check panicked".to_owned())
}

/// Runs `checks` against `backend` with one engine for those of them that
/// share one, stopped (and proven gone) at the end: for suites that reuse
/// the conformance checks outside [`run`] (RPC workers, attached servers).
pub async fn sharing_an_engine<T>(backend: &Backend, checks: impl AsyncFnOnce(&Backend) -> T) -> T {
    let mut backend = backend.clone();
    backend.shared = Some(Arc::new(SharedEngine::default()));
    let outcome = checks(&backend).await;
    if let Err(message) = stop_shared(&mut backend).await {
        panic!("{message}");
    }
    outcome
}

async fn stop_shared(backend: &mut Backend) -> Result<(), String> {
    let Some(shared) = backend.shared.take() else {
        return Ok(());
    };
    let shared = Arc::try_unwrap(shared).map_err(|_| "the shared engine is still in use")?;
    let Some(runtime) = shared.runtime.into_inner() else {
        return Ok(());
    };
    let mut runtime =
        Arc::try_unwrap(runtime.0).map_err(|_| "a check still holds the shared engine")?;
    runtime
        .shutdown()
        .await
        .map_err(|err| format!("stopping the shared engine: {}", err.with_sources()))?;
    drop(runtime);
    // With the shared engine's groups no longer excluded, nothing may be left.
    AssertUnwindSafe(crate::checks::assert_no_engine_left(backend))
        .catch_unwind()
        .await
        .map_err(|_| "the shared engine left processes behind".to_owned())
}
