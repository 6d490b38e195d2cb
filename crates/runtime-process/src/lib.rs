//! Supervising the server process of a model engine.
//!
//! This crate owns the child process of a server backend (llama-server, vLLM)
//! the way a careful supervisor does:
//! - [`ServerProcess::spawn`] starts it in its own process group, with a
//!   parent-death signal on Linux, from a thread that lives as long as the child;
//! - stdout and stderr are drained continuously into a bounded [`LogTail`] and to
//!   `tracing` (long lines cut, invalid UTF-8 tolerated);
//! - an exit watcher reports the exit status the moment the child exits;
//! - [`ServerProcess::wait_until_ready`] probes fast and on every new log line,
//!   fails at once if the child exits, and times out only when the log stalls;
//! - [`ServerProcess::stop`] sends SIGTERM to the group, waits a grace period,
//!   sends SIGKILL, and waits until the group is empty; dropping kills the group.
//!   The leader's zombie is kept until then, so the group id cannot be reused
//!   while we may still signal it;
//! - for engines that start processes of their own, a watcher inside the
//!   group terminates all of them if our process dies
//!   ([`ParentDeath::TerminateGroup`]);
//! - [`ServerProcess::listens_on`] tells whether a port's listening socket
//!   belongs to the engine's group, so a process squatting on the port cannot
//!   pass for the engine.
//!
//! It also finds engine binaries ([`BinarySearch`]) and free ports
//! ([`free_port`], [`ensure_port_free`]).
//!
//! It deliberately knows nothing about HTTP or any particular engine: what
//! "ready" means is a probe the backend passes in.
//!
//! ```no_run
//! # async fn demo() -> runtime_core::Result<()> {
//! use std::time::Duration;
//! use runtime_process::{ServerCommand, ServerProcess, StopPolicy};
//!
//! let mut command = ServerCommand::new("my-engine", "/usr/bin/my-engine");
//! command.args(["--port", "8080"]);
//! let process = ServerProcess::spawn(&command)?;
//! process
//!     .wait_until_ready(Duration::from_secs(30), || async {
//!         std::net::TcpStream::connect("127.0.0.1:8080").is_ok()
//!     })
//!     .await?;
//! process.stop(StopPolicy::new(Duration::from_secs(5))).await;
//! # Ok(())
//! # }
//! ```

mod command;
mod discovery;
mod log;
mod process;

#[cfg(unix)]
#[path = "unix.rs"]
mod platform;
#[cfg(not(unix))]
#[path = "other.rs"]
mod platform;

pub use command::{ParentDeath, ServerCommand};
pub use discovery::{BinarySearch, ensure_port_free, free_port};
pub use log::{LogTail, MAX_LINE_BYTES};
pub use process::{Exited, ServerProcess, StopPolicy};

/// Whether a process with this id exists now, of any user. Where that
/// cannot be known, `true`: use it to clean up after processes that died,
/// never to decide that one runs.
pub fn process_exists(pid: u32) -> bool {
    platform::process_exists(pid)
}
