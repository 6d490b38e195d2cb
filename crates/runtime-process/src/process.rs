//! A running engine: [`ServerProcess`].

use std::fmt;
use std::future::Future;
use std::io::Read;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use runtime_core::{Error, Result};
use tokio::sync::watch;

use crate::log::{LogTail, drain};
use crate::{ParentDeath, ServerCommand, platform};

/// How an engine process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exited {
    /// The status, if the operating system reported one.
    pub status: Option<ExitStatus>,
    description: String,
}

impl Exited {
    fn from_status(status: ExitStatus) -> Self {
        Self {
            status: Some(status),
            description: status.to_string(),
        }
    }

    fn unknown(reason: String) -> Self {
        Self {
            status: None,
            description: reason,
        }
    }
}

impl fmt::Display for Exited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

/// How [`ServerProcess::stop`] escalates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopPolicy {
    /// How long to wait after the first SIGTERM before SIGKILL.
    pub grace: Duration,
    /// Send a second SIGTERM this long after the first, for engines that finish
    /// in-flight work on the first and exit at once on the second (llama-server).
    pub repeat_term_after: Option<Duration>,
}

impl StopPolicy {
    /// SIGTERM, then SIGKILL after `grace`.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            repeat_term_after: None,
        }
    }
}

/// How long the group may take to empty once SIGKILL was sent.
const KILL_WAIT: Duration = Duration::from_secs(3);

/// A supervised engine process and its process group.
///
/// Spawned by [`ServerProcess::spawn`]:
/// - in a process group of its own, so stopping it stops everything it started;
/// - on Linux with a parent-death signal, so it dies if our process dies. The
///   signal fires when the *spawning thread* exits, so the child is spawned and
///   waited for on a dedicated thread that lives exactly as long as the child;
/// - with stdout and stderr drained continuously into a [`LogTail`] and `tracing`.
///
/// When the leader exits, its zombie is kept (Linux: `waitid` with `WNOWAIT`)
/// until the rest of its group is swept: while it exists, no unrelated process
/// can be given its pid or process group id, so the group is never signalled
/// by a number that has been reused.
///
/// Dropping it without [`stop`](Self::stop) kills the whole group.
pub struct ServerProcess {
    engine: String,
    pid: u32,
    log: LogTail,
    exit: watch::Receiver<Option<Exited>>,
    /// Set once the group was swept after the leader exited.
    swept: Mutex<bool>,
    /// Dropped to let the supervisor reap the leader's zombie.
    reap: Mutex<Option<Sender<()>>>,
}

impl fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerProcess")
            .field("engine", &self.engine)
            .field("pid", &self.pid)
            .field("exited", &*self.exit.borrow())
            .finish_non_exhaustive()
    }
}

impl ServerProcess {
    /// Starts `command`.
    ///
    /// Fails with [`Error::Spawn`] if the program cannot be executed.
    pub fn spawn(command: &ServerCommand) -> Result<Self> {
        let engine = command.engine.clone();
        let log = LogTail::new(command.log_lines);
        let (exit_tx, exit_rx) = watch::channel(None);
        let (spawned_tx, spawned_rx) = std::sync::mpsc::channel();
        let (reap_tx, reap_rx) = std::sync::mpsc::channel();
        let parent_death = command.parent_death;

        let mut std_command = std::process::Command::new(&command.program);
        std_command
            .args(&command.args)
            .envs(command.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        platform::configure(&mut std_command, command.parent_death);

        let supervisor_log = log.clone();
        let supervisor_engine = engine.clone();
        std::thread::Builder::new()
            .name(format!("{engine}-supervisor"))
            .spawn(move || {
                supervise(
                    std_command,
                    &supervisor_engine,
                    parent_death,
                    supervisor_log,
                    spawned_tx,
                    exit_tx,
                    reap_rx,
                );
            })
            .map_err(|source| Error::Spawn {
                binary: engine.clone(),
                source,
            })?;

        let pid = match spawned_rx.recv() {
            Ok(Ok(pid)) => pid,
            Ok(Err(source)) => {
                return Err(Error::Spawn {
                    binary: command.program.display().to_string(),
                    source,
                });
            }
            Err(_) => {
                return Err(Error::Spawn {
                    binary: command.program.display().to_string(),
                    source: std::io::Error::other("the supervisor thread ended before spawning"),
                });
            }
        };
        tracing::debug!(engine, pid, ?command, "engine started");
        Ok(Self {
            engine,
            pid,
            log,
            exit: exit_rx,
            swept: Mutex::new(false),
            reap: Mutex::new(Some(reap_tx)),
        })
    }

    /// The engine's name, as given to [`ServerCommand::new`].
    pub fn engine(&self) -> &str {
        &self.engine
    }

    /// The process id, which is also the process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The engine's recent output.
    pub fn log(&self) -> &LogTail {
        &self.log
    }

    /// How the process ended, or `None` while it runs. Cheap.
    pub fn exit_status(&self) -> Option<Exited> {
        self.exit.borrow().clone()
    }

    /// Whether the process is still running. Cheap.
    pub fn is_running(&self) -> bool {
        self.exit.borrow().is_none()
    }

    /// Whether a TCP socket listening on `port` belongs to this engine's
    /// process group: evidence that the engine, and not some other process
    /// that took the port, is what answers there. `None` where the platform
    /// cannot tell.
    pub fn listens_on(&self, port: u16) -> Option<bool> {
        platform::group_listens_on(self.pid, port)
    }

    /// The resident memory of the engine's whole process group, in bytes, or
    /// `None` where the platform cannot tell.
    pub fn resident_memory(&self) -> Option<u64> {
        platform::group_resident_memory(self.pid)
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_for_exit(&self, timeout: Duration) -> Option<Exited> {
        let mut exit = self.exit.clone();
        let exited = tokio::time::timeout(timeout, exit.wait_for(Option::is_some)).await;
        match exited {
            Ok(Ok(status)) => status.clone(),
            // The sender lives in the supervisor thread until it reports the exit.
            _ => self.exit_status(),
        }
    }

    /// The error describing the exit, with the log tail.
    pub fn exited_error(&self, exited: &Exited) -> Error {
        Error::EngineExited {
            engine: self.engine.clone(),
            status: exited.to_string(),
            log_tail: self.log.last(20),
        }
    }

    /// If the engine has exited, or exits within `within`, the error describing it.
    ///
    /// Server backends use this to turn a broken connection into
    /// [`Error::EngineExited`]: the socket closes a moment before the exit watcher
    /// reports, so a short wait tells a dead engine from a network hiccup.
    pub async fn exit_error(&self, within: Duration) -> Option<Error> {
        let exited = self.wait_for_exit(within).await?;
        Some(self.exited_error(&exited))
    }

    /// Waits until `probe` returns true.
    ///
    /// Probes at once, then every 10 ms backing off to 100 ms, and immediately
    /// whenever the engine logs a line. Fails at once with
    /// [`Error::EngineExited`] (exit status and log tail) if the process exits, and
    /// with [`Error::StartupTimeout`] once `stall_timeout` passes *with no new log
    /// line*: a slow load that keeps logging is not killed, a stuck one is.
    pub async fn wait_until_ready<F, Fut>(
        &self,
        stall_timeout: Duration,
        mut probe: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        const FIRST_DELAY: Duration = Duration::from_millis(10);
        const MAX_DELAY: Duration = Duration::from_millis(100);

        let started = Instant::now();
        let mut progress = self.log.subscribe();
        let mut exit = self.exit.clone();
        let mut last_progress = Instant::now();
        let mut delay = FIRST_DELAY;
        loop {
            if let Some(exited) = self.exit_status() {
                return Err(self.exited_error(&exited));
            }
            if probe().await {
                tracing::debug!(
                    engine = self.engine,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "engine ready"
                );
                return Ok(());
            }
            let deadline = last_progress + stall_timeout;
            if Instant::now() >= deadline {
                return Err(Error::StartupTimeout {
                    engine: self.engine.clone(),
                    elapsed: started.elapsed(),
                    log_tail: self.log.last(20),
                });
            }
            let sleep = delay.min(deadline.saturating_duration_since(Instant::now()));
            tokio::select! {
                changed = progress.changed() => {
                    if changed.is_ok() {
                        last_progress = Instant::now();
                    }
                }
                _ = exit.changed() => {}
                () = tokio::time::sleep(sleep) => {
                    delay = (delay * 2).min(MAX_DELAY);
                }
            }
        }
    }

    /// Stops the process group: SIGTERM, the grace period, SIGKILL, and waits
    /// until the whole group is gone. Idempotent; safe after the engine exited on
    /// its own (any process the engine left in its group is still killed).
    pub async fn stop(&self, policy: StopPolicy) -> Exited {
        if let Some(exited) = self.exit_status() {
            self.sweep_group().await;
            return exited;
        }
        let started = Instant::now();
        platform::terminate_group(self.pid);
        let mut exited = None;
        if let Some(repeat) = policy.repeat_term_after.filter(|d| *d < policy.grace) {
            exited = self.wait_for_exit(repeat).await;
            if exited.is_none() {
                platform::terminate_group(self.pid);
            }
        }
        if exited.is_none() {
            exited = self
                .wait_for_exit(policy.grace.saturating_sub(started.elapsed()))
                .await;
        }
        let exited = match exited {
            Some(exited) => exited,
            None => {
                tracing::warn!(
                    engine = self.engine,
                    grace_ms = policy.grace.as_millis() as u64,
                    "engine ignored SIGTERM; killing its process group"
                );
                platform::kill_group(self.pid);
                self.wait_for_exit(KILL_WAIT).await.unwrap_or_else(|| {
                    Exited::unknown("killed, but the exit was not observed".to_owned())
                })
            }
        };
        self.sweep_group().await;
        tracing::debug!(
            engine = self.engine,
            stop_ms = started.elapsed().as_millis() as u64,
            %exited,
            "engine stopped"
        );
        exited
    }

    /// Kills whatever is left in the group once the leader is gone, waits
    /// until the group is empty, then lets the leader's zombie be reaped.
    async fn sweep_group(&self) {
        {
            let mut swept = self.swept.lock().unwrap_or_else(|e| e.into_inner());
            if *swept {
                return;
            }
            *swept = true;
        }
        if platform::group_has_members(self.pid) {
            // The leader's zombie still holds the group id: this reaches our
            // group and nobody else's.
            platform::kill_group(self.pid);
            let deadline = Instant::now() + KILL_WAIT;
            while platform::group_has_members(self.pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.release_zombie();
    }

    fn release_zombie(&self) {
        self.reap.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let swept = *self.swept.lock().unwrap_or_else(|e| e.into_inner());
        if !swept {
            tracing::debug!(
                engine = self.engine,
                pid = self.pid,
                "killing engine on drop"
            );
            // Safe whether the leader runs or is a zombie: either way it holds
            // the group id.
            platform::kill_group(self.pid);
        }
        self.release_zombie();
    }
}

/// The body of the supervisor thread: spawn, report, drain, wait for the exit
/// (leaving the zombie), report, and reap once the owner has swept the group.
#[allow(clippy::too_many_arguments)]
fn supervise(
    mut command: std::process::Command,
    engine: &str,
    parent_death: ParentDeath,
    log: LogTail,
    spawned: std::sync::mpsc::Sender<std::io::Result<u32>>,
    exit: watch::Sender<Option<Exited>>,
    reap: Receiver<()>,
) {
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            let _ = spawned.send(Err(err));
            return;
        }
    };
    let mut drains = Vec::with_capacity(2);
    let pipes = [
        child
            .stdout
            .take()
            .map(|pipe| (Box::new(pipe) as Box<dyn Read + Send>, "stdout")),
        child
            .stderr
            .take()
            .map(|pipe| (Box::new(pipe) as Box<dyn Read + Send>, "stderr")),
    ];
    for (pipe, stream) in pipes.into_iter().flatten() {
        match spawn_drain(pipe, engine, stream, &log) {
            Ok(handle) => drains.push(handle),
            Err(err) => {
                // Without a drain the engine would block on a full pipe: give up.
                platform::kill_group(child.id());
                let _ = child.wait();
                let _ = spawned.send(Err(err));
                return;
            }
        }
    }
    // Held until this thread ends, after the engine is reaped: if our process
    // dies first, the watcher sees the pipe close.
    let _watcher = match parent_death {
        ParentDeath::TerminateGroup { grace } => {
            match platform::spawn_group_watcher(child.id(), grace) {
                Ok(owner_end) => Some(owner_end),
                Err(err) => {
                    platform::kill_group(child.id());
                    let _ = child.wait();
                    let _ = spawned.send(Err(err));
                    return;
                }
            }
        }
        ParentDeath::Kill => None,
    };
    let _ = spawned.send(Ok(child.id()));

    let exited = match platform::wait_exit(&mut child) {
        Ok(status) => Exited::from_status(status),
        Err(err) => Exited::unknown(format!("exit status unknown: {err}")),
    };
    // Let the drains reach end of file so the tail holds the engine's last words
    // before anyone is told it exited; a grandchild holding the pipe open must
    // not delay the report for long.
    let drained_by = Instant::now() + Duration::from_millis(200);
    for drain in drains {
        while !drain.is_finished() && Instant::now() < drained_by {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    tracing::debug!(engine, %exited, "engine exited");
    let _ = exit.send(Some(exited));
    // Blocks until the owner has swept the group (or is gone): the zombie
    // keeps the group id ours until then.
    let _ = reap.recv();
    platform::reap(&mut child);
}

fn spawn_drain(
    reader: Box<dyn Read + Send>,
    engine: &str,
    stream: &'static str,
    log: &LogTail,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let engine_name = engine.to_owned();
    let log = log.clone();
    std::thread::Builder::new()
        .name(format!("{engine}-{stream}"))
        .spawn(move || drain(reader, &engine_name, stream, &log))
}
