//! A spinner on the terminal while an engine starts: elapsed time and the
//! engine's latest log line, read from `tracing`. Nothing when stderr is not a
//! terminal.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The target runtime-process logs engine output under.
pub(crate) const ENGINE_LOG_TARGET: &str = "runtime_process::engine";

/// The engine's most recent log line, kept by a tracing layer.
#[derive(Debug, Clone, Default)]
pub(crate) struct LatestLine(Arc<Mutex<String>>);

impl LatestLine {
    fn get(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }
}

impl<S: Subscriber> Layer<S> for LatestLine {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != ENGINE_LOG_TARGET {
            return;
        }
        let mut visitor = MessageVisitor(String::new());
        event.record(&mut visitor);
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = visitor.0;
    }
}

/// A running spinner; [`Spinner::finish`] clears it.
#[derive(Debug)]
pub(crate) struct Spinner {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Spinner {
    /// Starts spinning with `label` if stderr is a terminal.
    pub(crate) fn start(label: String, latest: LatestLine) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self { task: None };
        }
        let started = Instant::now();
        let task = tokio::spawn(async move {
            const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
            for frame in FRAMES.iter().cycle() {
                let line: String = latest.get().chars().take(60).collect();
                {
                    let mut err = std::io::stderr().lock();
                    let _ = write!(
                        err,
                        "\r\x1b[2K{frame} {label} {:.1}s  {line}",
                        started.elapsed().as_secs_f64()
                    );
                    let _ = err.flush();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { task: Some(task) }
    }

    /// Stops and clears the spinner.
    pub(crate) fn finish(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}
