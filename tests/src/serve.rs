//! `model-runtime serve` as an operator runs it: the built binary, a
//! `models.toml` written by the test, signals, and what it prints.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::required_env;

/// The variable holding the built `model-runtime` binary.
pub const CLI_ENV: &str = "MODEL_RUNTIME_CLI_BIN";

/// `model-runtime` with `args`, killed if the test drops it.
pub fn command<I, S>(args: I) -> tokio::process::Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = tokio::process::Command::new(required_env(CLI_ENV));
    command
        .args(args)
        .kill_on_drop(true)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// What a command that is expected to fail at start printed, and its
/// status; fails the test if it is still running after `within`.
pub async fn failed_start(
    mut command: tokio::process::Command,
    within: Duration,
) -> (std::process::ExitStatus, String) {
    let output = tokio::time::timeout(within, command.output())
        .await
        .unwrap_or_else(|_| panic!("the command exits within {within:?}"))
        .expect("the command runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A `models.toml` in a directory of its own, rewritten at will.
#[derive(Debug)]
pub struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    /// A file holding `text`.
    pub fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("models.toml");
        let file = Self { _dir: dir, path };
        file.write(text);
        file
    }

    /// Replaces the file's text.
    pub fn write(&self, text: &str) {
        std::fs::write(&self.path, text).expect("writing models.toml");
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One `[[models]]` entry of the demo model on candle, with `extra` lines.
pub fn candle_model(name: &str, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\npath = {:?}\nbackend = \"candle\"\ncontext_size = 1024\n{extra}\n",
        required_env(crate::MODEL_ENV).display().to_string()
    )
}

/// A running `model-runtime serve --config FILE`.
#[derive(Debug)]
pub struct Serving {
    child: tokio::process::Child,
    /// What it wrote to stderr, read as it comes (so it never blocks on a
    /// full pipe).
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Serving {
    /// Starts `serve --config file` listening on `port` (which the file
    /// names) with `env`, and waits until `/health` answers 200.
    pub async fn start(file: &ConfigFile, port: u16, env: &[(&str, &str)]) -> Self {
        let mut command = command(["serve", "--config"]);
        command.arg(file.path());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("model-runtime serve starts");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buffer = [0u8; 4096];
            while let Ok(read) = pipe.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });
        let base = format!("http://127.0.0.1:{port}");
        let mut serving = Self {
            child,
            stderr,
            base,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = http.get(format!("{}/health", serving.base)).send().await
                && response.status() == 200
            {
                return serving;
            }
            if let Ok(Some(status)) = serving.child.try_wait() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "serve exited before it was healthy ({status}): {}",
                    serving.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "serve became healthy within a minute"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` to `serve`.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("serve is running") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signalling serve");
    }

    /// Stops `serve` (SIGTERM) and waits for it; fails after ten seconds.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("serve exits within ten seconds of SIGTERM")
            .expect("waiting for serve")
    }

    /// What `serve` wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
