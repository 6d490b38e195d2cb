//! Process control on platforms without process groups and signals.
//!
//! Best effort: Windows has no process groups in the Unix sense, so the tree is
//! terminated with `taskkill /T`; other platforms only stop the process itself.

use std::process::{Command, ExitStatus};
use std::time::Duration;

/// Nothing to configure: no process groups or parent-death signal here.
pub(crate) fn configure(_command: &mut Command, _parent_death: crate::ParentDeath) {}

/// No watcher: without process groups there is no group to signal. The
/// returned pipe end stands in for the Unix watcher's.
pub(crate) fn spawn_group_watcher(
    _pgid: u32,
    _grace: Duration,
) -> std::io::Result<std::io::PipeWriter> {
    std::io::pipe().map(|(_, writer)| writer)
}

/// Asks the process tree to stop.
pub(crate) fn terminate_group(pid: u32) {
    taskkill(pid, false);
}

/// Forces the process tree to stop.
pub(crate) fn kill_group(pid: u32) {
    taskkill(pid, true);
}

/// Without groups the leader's exit is all that can be observed.
pub(crate) fn group_has_members(_pid: u32) -> bool {
    false
}

/// Waits for and reaps the child: there is no zombie to keep here.
pub(crate) fn wait_exit(child: &mut std::process::Child) -> std::io::Result<ExitStatus> {
    child.wait()
}

/// Nothing left to reap.
pub(crate) fn reap(_child: &mut std::process::Child) {}

/// Memory use cannot be read here.
pub(crate) fn group_resident_memory(_pid: u32) -> Option<u64> {
    None
}

/// Socket ownership cannot be read here.
pub(crate) fn group_listens_on(_pgid: u32, _port: u16) -> Option<bool> {
    None
}

fn taskkill(pid: u32, force: bool) {
    let mut command = Command::new("taskkill");
    command.args(["/T", "/PID", &pid.to_string()]);
    if force {
        command.arg("/F");
    }
    if let Err(err) = command.output() {
        tracing::warn!(pid, error = %err, "could not stop engine process tree");
    }
}

/// Whether a process `pid` exists: not knowable here, so assumed (callers
/// use it to clean up after dead processes and must not clean up after
/// live ones).
pub(crate) fn process_exists(_pid: u32) -> bool {
    true
}
