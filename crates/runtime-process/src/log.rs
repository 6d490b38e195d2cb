//! The engine's recent output: a bounded ring of lines, fed by drain threads.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// Lines longer than this are cut (the rest of the line is dropped).
pub const MAX_LINE_BYTES: usize = 4096;

/// The most recent lines an engine wrote to stdout and stderr, oldest first.
///
/// Cheap to clone (shared). Every new line bumps a progress counter that
/// [`LogTail::subscribe`] watches, which is how readiness polling reacts to a
/// line such as llama-server's `listening on` within a millisecond and how the
/// startup deadline learns that loading is still progressing.
#[derive(Debug, Clone)]
pub struct LogTail {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    lines: Mutex<VecDeque<String>>,
    capacity: usize,
    progress: watch::Sender<u64>,
}

impl LogTail {
    /// An empty ring keeping the last `capacity` lines.
    pub fn new(capacity: usize) -> Self {
        let (progress, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                lines: Mutex::new(VecDeque::with_capacity(capacity)),
                capacity: capacity.max(1),
                progress,
            }),
        }
    }

    /// Appends a line, evicting the oldest when full.
    pub fn push(&self, line: String) {
        {
            let mut lines = self.lock();
            if lines.len() == self.inner.capacity {
                lines.pop_front();
            }
            lines.push_back(line);
        }
        self.inner.progress.send_modify(|count| *count += 1);
    }

    /// All kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    /// The last `n` kept lines, oldest first.
    pub fn last(&self, n: usize) -> Vec<String> {
        let lines = self.lock();
        lines
            .iter()
            .skip(lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// Whether any kept line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.lock().iter().any(|line| line.contains(needle))
    }

    /// How many lines were ever pushed (not just kept).
    pub fn line_count(&self) -> u64 {
        *self.inner.progress.borrow()
    }

    /// A receiver that changes whenever a line arrives.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.progress.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<String>> {
        // A panic while holding the lock cannot leave the ring inconsistent.
        self.inner
            .lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads `reader` until end of file, splitting on `\n` and `\r` (progress bars),
/// keeping at most [`MAX_LINE_BYTES`] of each line, decoding lossily, and feeding
/// every non-empty line to `tail` and to `tracing`.
///
/// Never stops reading before end of file: an undrained pipe would block the
/// engine once the pipe buffer fills.
pub(crate) fn drain(reader: impl Read, engine: &str, stream: &'static str, tail: &LogTail) {
    let mut reader = BufReader::with_capacity(16 * 1024, reader);
    let mut line = Vec::with_capacity(256);
    loop {
        let buf = match reader.fill_buf() {
            Ok([]) => break,
            Ok(buf) => buf,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::debug!(engine, stream, error = %err, "engine output stopped");
                break;
            }
        };
        let consumed = buf.len();
        for &byte in buf {
            if byte == b'\n' || byte == b'\r' {
                emit(&mut line, engine, stream, tail);
            } else if line.len() < MAX_LINE_BYTES {
                line.push(byte);
            }
        }
        reader.consume(consumed);
    }
    emit(&mut line, engine, stream, tail);
}

fn emit(line: &mut Vec<u8>, engine: &str, stream: &'static str, tail: &LogTail) {
    if line.iter().all(u8::is_ascii_whitespace) {
        line.clear();
        return;
    }
    let text = String::from_utf8_lossy(line).into_owned();
    line.clear();
    tracing::debug!(target: "runtime_process::engine", engine, stream, "{text}");
    tail.push(text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_most_recent_lines() {
        let tail = LogTail::new(2);
        for line in ["a", "b", "c"] {
            tail.push(line.into());
        }
        assert_eq!(tail.lines(), ["b", "c"]);
        assert_eq!(tail.last(1), ["c"]);
        assert_eq!(tail.line_count(), 3);
    }

    #[test]
    fn drain_splits_on_lf_cr_and_crlf_and_tolerates_bad_utf8() {
        let tail = LogTail::new(10);
        let input: &[u8] = b"one\r\ntwo\rthree\n\n\xff\xfefour";
        drain(input, "engine", "stderr", &tail);
        assert_eq!(
            tail.lines(),
            ["one", "two", "three", "\u{fffd}\u{fffd}four"]
        );
    }

    #[test]
    fn drain_cuts_overlong_lines_and_keeps_reading() {
        let tail = LogTail::new(10);
        let mut input = vec![b'x'; MAX_LINE_BYTES * 3];
        input.extend_from_slice(b"\nnext\n");
        drain(input.as_slice(), "engine", "stdout", &tail);
        let lines = tail.lines();
        assert_eq!(lines[0].len(), MAX_LINE_BYTES);
        assert_eq!(lines[1], "next");
    }
}
