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

use crate::{Backend, CHECK_TIMEOUT, procs};

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
/// of them, shut down when the suite ends.
#[derive(Default)]
pub struct SharedEngine {
    runtime: tokio::sync::OnceCell<Box<dyn ModelRuntime>>,
    /// The process groups of the shared engine, which the leak check after
    /// each check does not count.
    groups: std::sync::Mutex<Vec<i32>>,
}

impl std::fmt::Debug for SharedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedEngine")
            .field("started", &self.runtime.initialized())
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
}

/// The suite's shared engine for `backend`, started on first use with the
/// backend's configuration. Only checks declared `shared` may call it: the
/// engine must be idle and healthy when they return.
pub async fn shared_runtime(backend: &Backend) -> &dyn ModelRuntime {
    let shared = backend.shared.as_ref().expect(
        "the check is declared `shared` (only the harness's backends have an engine to share)",
    );
    let runtime = shared
        .runtime
        .get_or_init(|| async {
            tracing::info!(backend = backend.name, "starting the suite's shared engine");
            let runtime = crate::checks::start(backend).await;
            if backend.server.is_some() {
                let port = procs::port_of(&runtime.base_url());
                let mut groups: Vec<i32> =
                    procs::engine_on_port(port).iter().map(|p| p.pgid).collect();
                groups.dedup();
                *shared
                    .groups
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = groups;
            }
            runtime
        })
        .await;
    runtime.as_ref()
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

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
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
    let mut shared = Arc::try_unwrap(shared).map_err(|_| "the shared engine is still in use")?;
    let Some(mut runtime) = shared.runtime.take() else {
        return Ok(());
    };
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
