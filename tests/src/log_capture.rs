//! Everything logged through `tracing` while a check runs, engine output
//! included, so a check can prove what never appears in a log.

use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The captured text while capturing.
static CAPTURED: Mutex<Option<String>> = Mutex::new(None);

/// Starts capturing (discarding anything captured before).
pub fn start() {
    *CAPTURED.lock().unwrap_or_else(PoisonError::into_inner) = Some(String::new());
}

/// Stops capturing and returns what was logged since [`start`].
pub fn take() -> String {
    CAPTURED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .unwrap_or_default()
}

/// The layer [`crate::init_tracing`] installs, at debug level for every target.
pub(crate) struct CaptureLayer;

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, " {}={value}", field.name());
    }
}

impl<S: Subscriber> Layer<S> for CaptureLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut captured = CAPTURED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(text) = captured.as_mut() {
            text.push_str(event.metadata().target());
            event.record(&mut Fields(text));
            text.push('\n');
        }
    }
}
