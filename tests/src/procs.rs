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

/// The engine listening on `port` (found by its `--port` argument, matched
/// exactly) and every process in its group.
pub fn engine_on_port(port: u16) -> Vec<Proc> {
    let procs = all();
    let leaders: Vec<i32> = procs
        .iter()
        .filter(|p| has_port_argument(p, port))
        .map(|p| p.pgid)
        .collect();
    procs
        .into_iter()
        .filter(|p| leaders.contains(&p.pgid))
        .collect()
}

/// Whether `process` was started with `--port PORT`, exactly that port.
fn has_port_argument(process: &Proc, port: u16) -> bool {
    let port = port.to_string();
    process
        .args
        .windows(2)
        .any(|pair| pair[0] == "--port" && pair[1] == port)
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

/// The port of a `http://host:port` URL.
pub fn port_of(base_url: &str) -> u16 {
    base_url
        .rsplit(':')
        .next()
        .and_then(|port| port.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("{base_url:?} has no port"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_matches_only_the_same_number() {
        let proc = |args: &[&str]| Proc {
            pid: 1,
            pgid: 1,
            cmdline: args.join(" "),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        let engine = proc(&["llama-server", "--port", "8080"]);
        assert!(has_port_argument(&engine, 8080));
        assert!(!has_port_argument(&engine, 80));
        assert!(!has_port_argument(&proc(&["x", "--port", "80800"]), 8080));
        assert!(!has_port_argument(&proc(&["x", "--port=8080"]), 8080));
    }
}
