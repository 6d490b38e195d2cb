//! Finding engine processes through `/proc`, to prove none is left behind.

use std::path::Path;
use std::time::{Duration, Instant};

/// A live (not zombie) process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// Process id.
    pub pid: i32,
    /// Process group id.
    pub pgid: i32,
    /// The command line, arguments joined by spaces.
    pub cmdline: String,
    /// The arguments, the program first.
    pub args: Vec<String>,
}

/// Every live process on the machine.
pub fn all() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read)
        .collect()
}

fn read(pid: i32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: parse after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    let pgid = fields.get(2)?.parse().ok()?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    Some(Proc {
        pid,
        pgid,
        cmdline: args.join(" "),
        args,
    })
}

/// Processes running `binary`.
pub fn running(binary: &Path) -> Vec<Proc> {
    let binary = binary.to_string_lossy();
    all()
        .into_iter()
        .filter(|p| p.cmdline.split(' ').next() == Some(&*binary))
        .collect()
}

/// Every live process of the process group `pgid` (an engine's leader's pid).
pub fn group(pgid: i32) -> Vec<Proc> {
    all().into_iter().filter(|p| p.pgid == pgid).collect()
}

/// Whether `pid` is alive (and not a zombie).
pub fn alive(pid: i32) -> bool {
    read(pid).is_some()
}

/// Waits up to `timeout` for every pid to be gone; returns those still alive.
pub async fn wait_gone(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|&pid| alive(pid)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `signal` to every process in `procs`.
pub fn signal_all(procs: &[Proc], signal: nix::sys::signal::Signal) {
    for process in procs {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(process.pid), signal);
    }
}

/// The TCP ports that processes of the group `pgid` listen on (IPv4 and
/// IPv6), found through `/proc/net/tcp*` and the processes' descriptors.
pub fn listening_ports(pgid: i32) -> Vec<u16> {
    // inode -> port of every listening TCP socket (state 0A).
    let mut listening = std::collections::HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && fields[3] == "0A" {
                let port = fields[1]
                    .rsplit(':')
                    .next()
                    .and_then(|hex| u16::from_str_radix(hex, 16).ok());
                if let (Some(port), Ok(inode)) = (port, fields[9].parse::<u64>()) {
                    listening.insert(inode, port);
                }
            }
        }
    }
    let mut ports: Vec<u16> = all()
        .into_iter()
        .filter(|p| p.pgid == pgid)
        .flat_map(|p| {
            std::fs::read_dir(format!("/proc/{}/fd", p.pid))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|target| {
                    let target = target.to_string_lossy().into_owned();
                    target
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse::<u64>()
                        .ok()
                })
                .collect::<Vec<_>>()
        })
        .filter_map(|inode| listening.get(&inode).copied())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The port of a `http://host:port` URL.
pub fn port_of(base_url: &str) -> u16 {
    base_url
        .rsplit(':')
        .next()
        .and_then(|port| port.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("{base_url:?} has no port"))
}
