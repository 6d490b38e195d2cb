//! Process groups and signals on Unix.
//!
//! The parent-death signal is set in a `pre_exec` hook, the one place in the
//! project that needs `unsafe`.

use std::os::unix::process::CommandExt;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::ParentDeath;

/// Puts the child in a process group of its own and, on Linux, asks the kernel
/// to signal it when the spawning thread exits.
pub(crate) fn configure(command: &mut std::process::Command, parent_death: ParentDeath) {
    command.process_group(0);
    #[cfg(target_os = "linux")]
    set_parent_death_signal(command, parent_death);
    #[cfg(not(target_os = "linux"))]
    let _ = parent_death;
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_parent_death_signal(command: &mut std::process::Command, parent_death: ParentDeath) {
    let parent = nix::unistd::getpid();
    let signal = match parent_death {
        ParentDeath::Kill => Signal::SIGKILL,
        ParentDeath::Terminate => Signal::SIGTERM,
    };
    // SAFETY: the hook runs in the forked child before exec and only makes two
    // async-signal-safe system calls (prctl, getppid) plus raise; it allocates
    // nothing and touches no locks.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(signal)?;
            // The parent may have died between fork and prctl: then nobody would
            // ever send the signal.
            if nix::unistd::getppid() != parent {
                nix::sys::signal::raise(signal)?;
            }
            Ok(())
        });
    }
}

/// SIGTERM to the group led by `pid`.
pub(crate) fn terminate_group(pid: u32) {
    signal_group(pid, Signal::SIGTERM);
}

/// SIGKILL to the group led by `pid`.
pub(crate) fn kill_group(pid: u32) {
    signal_group(pid, Signal::SIGKILL);
}

/// Whether any process (zombies included) is still in the group led by `pid`.
pub(crate) fn group_exists(pid: u32) -> bool {
    let Some(pgid) = to_pid(pid) else {
        return false;
    };
    // Signal 0 checks existence; EPERM means it exists but is not ours.
    !matches!(killpg(pgid, None), Err(Errno::ESRCH))
}

fn signal_group(pid: u32, signal: Signal) {
    let Some(pgid) = to_pid(pid) else {
        return;
    };
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => tracing::warn!(pid, %signal, error = %err, "could not signal engine group"),
    }
}

/// Guards against signalling group 0 or -1 (our own group, everyone).
fn to_pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|&p| p > 1)
        .map(Pid::from_raw)
}
