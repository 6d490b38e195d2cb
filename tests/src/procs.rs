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
    let cmdline = raw
        .split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    Some(Proc { pid, pgid, cmdline })
}

/// Processes running `binary`.
pub fn running(binary: &Path) -> Vec<Proc> {
    let binary = binary.to_string_lossy();
    all()
        .into_iter()
        .filter(|p| p.cmdline.split(' ').next() == Some(&*binary))
        .collect()
}

/// The engine listening on `port` (found by its `--port` argument) and every
/// process in its group.
pub fn engine_on_port(port: u16) -> Vec<Proc> {
    let procs = all();
    let needle = format!("--port {port}");
    let leaders: Vec<i32> = procs
        .iter()
        .filter(|p| p.cmdline.contains(&needle) && !p.cmdline.contains("cargo"))
        .map(|p| p.pgid)
        .collect();
    procs
        .into_iter()
        .filter(|p| leaders.contains(&p.pgid))
        .collect()
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

/// The port of a `http://host:port` URL.
pub fn port_of(base_url: &str) -> u16 {
    base_url
        .rsplit(':')
        .next()
        .and_then(|port| port.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("{base_url:?} has no port"))
}
