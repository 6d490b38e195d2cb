//! Process control on platforms without process groups and signals.
//!
//! Best effort: Windows has no process groups in the Unix sense, so the tree is
//! terminated with `taskkill /T`; other platforms only stop the process itself.

/// Nothing to configure: no process groups or parent-death signal here.
pub(crate) fn configure(_command: &mut std::process::Command, _parent_death: crate::ParentDeath) {}

/// Asks the process tree to stop.
pub(crate) fn terminate_group(pid: u32) {
    taskkill(pid, false);
}

/// Forces the process tree to stop.
pub(crate) fn kill_group(pid: u32) {
    taskkill(pid, true);
}

/// Without groups the leader's exit is all that can be observed.
pub(crate) fn group_exists(_pid: u32) -> bool {
    false
}

fn taskkill(pid: u32, force: bool) {
    let mut command = std::process::Command::new("taskkill");
    command.args(["/T", "/PID", &pid.to_string()]);
    if force {
        command.arg("/F");
    }
    if let Err(err) = command.output() {
        tracing::warn!(pid, error = %err, "could not stop engine process tree");
    }
}
