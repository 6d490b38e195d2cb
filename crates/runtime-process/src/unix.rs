//! Process groups, signals and `/proc` on Unix.
//!
//! The parent-death signal is set in a `pre_exec` hook, the one place in the
//! project that needs `unsafe`.

use std::io::PipeWriter;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::ParentDeath;

/// Puts the child in a process group of its own and, on Linux, asks the kernel
/// to signal it when the spawning thread exits.
pub(crate) fn configure(command: &mut Command, parent_death: ParentDeath) {
    command.process_group(0);
    let signal = match parent_death {
        ParentDeath::Kill => Signal::SIGKILL,
        ParentDeath::TerminateGroup { .. } => Signal::SIGTERM,
    };
    set_parent_death_signal(command, signal);
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_parent_death_signal(command: &mut Command, signal: Signal) {
    let parent = nix::unistd::getpid();
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

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_command: &mut Command, _signal: Signal) {}

/// Starts a watcher inside the engine's group `pgid`: when our process dies it
/// sends SIGTERM to the whole group, waits `grace`, then SIGKILL. The engine's
/// own parent-death signal reaches its leader only; a leader that stalls would
/// leave the processes it started running without this.
///
/// The watcher is a `/bin/sh` reading a pipe whose write end only this
/// process holds (the returned [`PipeWriter`]; keep it for as long as the
/// engine runs): when we die, the kernel closes it and the watcher reads end
/// of file, whenever that happens, even before the watcher got going. It
/// ignores SIGTERM, so a normal stop (which signals the group) does not set
/// it off, and it is killed with the group when the engine stops.
pub(crate) fn spawn_group_watcher(pgid: u32, grace: Duration) -> std::io::Result<PipeWriter> {
    const SCRIPT: &str = "trap '' TERM INT HUP; \
        while read -r _; do :; done; \
        kill -TERM -$0 2>/dev/null; sleep $1; kill -KILL -$0 2>/dev/null";
    // Both ends are close-on-exec: no other child inherits the write end.
    let (reader, writer) = std::io::pipe()?;
    Command::new("/bin/sh")
        .args(["-c", SCRIPT])
        .arg(pgid.to_string())
        .arg(format!("{:.3}", grace.as_secs_f64()))
        .stdin(reader)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(pgid as i32)
        // Not waited for: it dies with the group, or init reaps it.
        .spawn()?;
    Ok(writer)
}

/// SIGTERM to the group led by `pid`.
pub(crate) fn terminate_group(pid: u32) {
    signal_group(pid, Signal::SIGTERM);
}

/// SIGKILL to the group led by `pid`.
pub(crate) fn kill_group(pid: u32) {
    signal_group(pid, Signal::SIGKILL);
}

/// Whether any live process other than the leader `pid` is left in its group.
/// Zombies count as gone: init reaps those whose parent died.
pub(crate) fn group_has_members(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        proc_stats().any(|(member, state, pgrp)| pgrp == pid && member != pid && state != 'Z')
    }
    #[cfg(not(target_os = "linux"))]
    {
        // Without /proc the leader cannot be told apart; it was reaped already.
        let Some(pgid) = to_pid(pid) else {
            return false;
        };
        !matches!(killpg(pgid, None), Err(Errno::ESRCH))
    }
}

/// Waits for the child `pid` to exit *without reaping it* where the platform
/// allows (Linux `waitid` with `WNOWAIT`): while its zombie exists, neither its
/// pid nor its process group id can be reused, so signalling the group stays
/// safe until [`reap`] is called.
pub(crate) fn wait_exit(child: &mut std::process::Child) -> std::io::Result<ExitStatus> {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
        let pid = Pid::from_raw(child.id() as i32);
        loop {
            match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(WaitStatus::Exited(_, code)) => {
                    return Ok(ExitStatus::from_raw((code & 0xff) << 8));
                }
                Ok(WaitStatus::Signaled(_, signal, core)) => {
                    return Ok(ExitStatus::from_raw(
                        signal as i32 | if core { 0x80 } else { 0 },
                    ));
                }
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(err) => return Err(err.into()),
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        child.wait()
    }
}

/// Reaps the child [`wait_exit`] left as a zombie.
pub(crate) fn reap(child: &mut std::process::Child) {
    let _ = child.wait();
}

/// Whether a TCP socket listening on `port` belongs to a process of the group
/// led by `pgid`. `None` where the platform cannot tell (no `/proc`).
pub(crate) fn group_listens_on(pgid: u32, port: u16) -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        let inodes = listening_inodes(port);
        if inodes.is_empty() {
            return Some(false);
        }
        let members: Vec<u32> = proc_stats()
            .filter(|(_, _, pgrp)| *pgrp == pgid)
            .map(|(pid, _, _)| pid)
            .collect();
        Some(members.iter().any(|pid| owns_any_socket(*pid, &inodes)))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (pgid, port);
        None
    }
}

/// The resident set of every live process in the group led by `pgid`, in
/// bytes. `None` where there is no `/proc`.
pub(crate) fn group_resident_memory(pgid: u32) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|size| u64::try_from(size).ok())
            .unwrap_or(4096);
        let pages: u64 = proc_stats()
            .filter(|(_, state, pgrp)| *pgrp == pgid && *state != 'Z')
            .filter_map(|(pid, _, _)| {
                let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
                statm.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .sum();
        Some(pages * page)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pgid;
        None
    }
}

/// `(pid, state, process group)` of every process in `/proc`.
#[cfg(target_os = "linux")]
fn proc_stats() -> impl Iterator<Item = (u32, char, u32)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may hold spaces and parentheses: parse after the last ')'.
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
            let state = fields.next()?.chars().next()?;
            let pgrp = fields.nth(1)?.parse().ok()?;
            Some((pid, state, pgrp))
        })
}

/// Inodes of the TCP sockets (IPv4 and IPv6) in LISTEN state on `port`.
#[cfg(target_os = "linux")]
fn listening_inodes(port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
            if *state == LISTEN
                && local_port == Some(port)
                && let Ok(inode) = inode.parse()
            {
                inodes.push(inode);
            }
        }
    }
    inodes
}

#[cfg(target_os = "linux")]
fn owns_any_socket(pid: u32, inodes: &[u64]) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
                .is_some_and(|inode| inodes.contains(&inode))
        })
    })
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::time::Instant;

    use super::*;

    fn state_of(pid: u32) -> Option<char> {
        proc_stats().find(|(p, _, _)| *p == pid).map(|(_, s, _)| s)
    }

    #[test]
    fn the_watcher_terminates_then_kills_the_group_when_its_owner_dies() {
        // A leader that ignores SIGTERM, as a stalled engine would. It says so
        // once the trap is set: a SIGTERM sent before that would end it and
        // prove nothing about the SIGKILL that must follow.
        let mut leader = Command::new("/bin/sh")
            .args([
                "-c",
                "trap '' TERM; echo trapped; while :; do sleep 1; done",
            ])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut trapped = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(leader.stdout.take().unwrap()),
            &mut trapped,
        )
        .unwrap();
        assert_eq!(trapped, "trapped\n");
        let pgid = leader.id();
        // The owner dies at once, before the watcher has even started reading:
        // the kernel closing its end of the pipe is what the watcher waits for.
        let owner_end = spawn_group_watcher(pgid, Duration::from_millis(300)).unwrap();
        drop(owner_end);
        let deadline = Instant::now() + Duration::from_secs(3);
        let status = loop {
            if let Some(status) = leader.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
                let _ = leader.wait();
                panic!("the leader outlived its owner by 3 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "{status:?}");
        let deadline = Instant::now() + Duration::from_secs(3);
        while group_has_members(pgid) {
            assert!(
                Instant::now() < deadline,
                "the watcher left the group behind"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn waiting_for_an_exit_leaves_the_zombie_until_it_is_reaped() {
        let mut child = Command::new("/bin/sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let status = wait_exit(&mut child).unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(state_of(pid), Some('Z'), "the pid stays taken");
        reap(&mut child);
        assert_eq!(state_of(pid), None);
    }
}

/// Whether a process `pid` exists (signal 0; a process of another user
/// exists too).
pub(crate) fn process_exists(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(Pid::from_raw(pid), None),
        Err(Errno::ESRCH)
    )
}
