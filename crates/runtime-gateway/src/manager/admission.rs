//! Admission: at most `parallel` requests of a model run at once, at most
//! `queue` wait (past that, [`Error::Busy`]), for at most the queue timeout.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use runtime_core::{Error, Result};
use tokio::sync::OwnedSemaphorePermit;

use super::Inner;
use super::model::Model;
use crate::metrics::Metrics;

impl Inner {
    /// Waits for a slot of `model`: at most `queue` requests wait, for at
    /// most the queue timeout; a request whose caller gives up leaves the
    /// queue (the future is dropped).
    pub(super) async fn admit(&self, model: &Arc<Model>) -> Result<OwnedSemaphorePermit> {
        if let Ok(permit) = model.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queue = model.spec.queue() as usize;
        let waiting = model.waiting.fetch_add(1, Ordering::SeqCst);
        let _leave = Waiting {
            model: model.clone(),
            metrics: &self.metrics,
        };
        if waiting >= queue {
            return Err(Error::Busy(format!(
                "model `{}` has {queue} requests waiting already; retry later",
                model.name()
            )));
        }
        self.metrics.set_queue_depth(model.name(), waiting + 1);
        let timeout = self.settings().queue_timeout;
        match tokio::time::timeout(timeout, model.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Error::ShutDown),
            Err(_) => Err(Error::ModelUnavailable {
                model: model.name().to_owned(),
                reason: format!("no slot was free within {timeout:?}"),
                retry_after: Some(Duration::from_secs(1)),
            }),
        }
    }
}

/// A waiting request; leaving (admitted, refused, or dropped by a caller
/// that went away) takes it out of the count.
pub(super) struct Waiting<'a> {
    pub(super) model: Arc<Model>,
    pub(super) metrics: &'a Metrics,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let left = self.model.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.set_queue_depth(self.model.name(), left);
    }
}
