//! [`VllmOptions`]: what vLLM takes beyond [`RuntimeConfig`](runtime_core::RuntimeConfig).

use runtime_core::{BackendOptions, Error, Result};
use serde::{Deserialize, Serialize};

/// vLLM's own settings, beyond the fields of
/// [`RuntimeConfig`](runtime_core::RuntimeConfig).
///
/// Set from code with [`RuntimeConfig::with_options`](runtime_core::RuntimeConfig::with_options),
/// or as the same keys in `extra_config`. Unset fields leave vLLM's defaults.
///
/// ```
/// use runtime_core::RuntimeConfig;
/// use runtime_vllm::VllmOptions;
///
/// let options = VllmOptions::new()
///     .with_tensor_parallel_size(2)
///     .with_gpu_memory_utilization(0.85)
///     .with_enforce_eager(true);
/// let config = RuntimeConfig::new("models/smollm2-hf").with_options(&options);
/// assert_eq!(config.options::<VllmOptions>().unwrap(), options);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct VllmOptions {
    /// Which command line starts vLLM.
    #[serde(skip_serializing_if = "VllmLaunch::is_auto")]
    pub launch: VllmLaunch,
    /// The weights' data type (`--dtype`: `auto`, `bfloat16`, `float16`, `float32`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Ranks that split each layer (`--tensor-parallel-size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensor_parallel_size: Option<u32>,
    /// Ranks that split the layers into stages (`--pipeline-parallel-size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline_parallel_size: Option<u32>,
    /// How ranks are run (`--distributed-executor-backend`: `mp`, `ray`, `uni`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distributed_executor_backend: Option<String>,
    /// The fraction of GPU memory vLLM may use (`--gpu-memory-utilization`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory_utilization: Option<f32>,
    /// Skip graph capture: starts much faster, decodes a little slower
    /// (`--enforce-eager`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub enforce_eager: bool,
    /// GiB of KV cache for the CPU build (`VLLM_CPU_KVCACHE_SPACE`; default 2,
    /// or the variable's value in our environment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_kvcache_space_gib: Option<u32>,
    /// Let vLLM try a GGUF file (its GGUF support is experimental).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_gguf: bool,
}

/// Which command line starts vLLM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum VllmLaunch {
    /// The module when a Python is known (it works where the CPU build's
    /// `vllm` command does not), else `vllm serve`.
    #[default]
    Auto,
    /// `PYTHON -m vllm.entrypoints.openai.api_server`.
    Module,
    /// `vllm serve`.
    Serve,
}

impl VllmLaunch {
    fn is_auto(&self) -> bool {
        *self == Self::Auto
    }
}

impl VllmOptions {
    /// Every option at vLLM's default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`launch`](Self::launch).
    #[must_use]
    pub fn with_launch(mut self, launch: VllmLaunch) -> Self {
        self.launch = launch;
        self
    }

    /// Sets [`dtype`](Self::dtype).
    #[must_use]
    pub fn with_dtype(mut self, dtype: impl Into<String>) -> Self {
        self.dtype = Some(dtype.into());
        self
    }

    /// Sets [`tensor_parallel_size`](Self::tensor_parallel_size).
    #[must_use]
    pub fn with_tensor_parallel_size(mut self, ranks: u32) -> Self {
        self.tensor_parallel_size = Some(ranks);
        self
    }

    /// Sets [`pipeline_parallel_size`](Self::pipeline_parallel_size).
    #[must_use]
    pub fn with_pipeline_parallel_size(mut self, stages: u32) -> Self {
        self.pipeline_parallel_size = Some(stages);
        self
    }

    /// Sets [`distributed_executor_backend`](Self::distributed_executor_backend).
    #[must_use]
    pub fn with_distributed_executor_backend(mut self, backend: impl Into<String>) -> Self {
        self.distributed_executor_backend = Some(backend.into());
        self
    }

    /// Sets [`gpu_memory_utilization`](Self::gpu_memory_utilization).
    #[must_use]
    pub fn with_gpu_memory_utilization(mut self, fraction: f32) -> Self {
        self.gpu_memory_utilization = Some(fraction);
        self
    }

    /// Sets [`enforce_eager`](Self::enforce_eager).
    #[must_use]
    pub fn with_enforce_eager(mut self, eager: bool) -> Self {
        self.enforce_eager = eager;
        self
    }

    /// Sets [`cpu_kvcache_space_gib`](Self::cpu_kvcache_space_gib).
    #[must_use]
    pub fn with_cpu_kvcache_space_gib(mut self, gib: u32) -> Self {
        self.cpu_kvcache_space_gib = Some(gib);
        self
    }

    /// Sets [`allow_gguf`](Self::allow_gguf).
    #[must_use]
    pub fn with_allow_gguf(mut self, allow: bool) -> Self {
        self.allow_gguf = allow;
        self
    }
}

impl BackendOptions for VllmOptions {
    const BACKEND: &'static str = "vLLM";

    fn validate(&self) -> Result<()> {
        for (key, value) in [
            ("tensor_parallel_size", self.tensor_parallel_size),
            ("pipeline_parallel_size", self.pipeline_parallel_size),
            ("cpu_kvcache_space_gib", self.cpu_kvcache_space_gib),
        ] {
            if value == Some(0) {
                return Err(Error::invalid_config(
                    format!("extra_config.{key}"),
                    "must be at least 1 (leave it unset for the default)",
                ));
            }
        }
        if let Some(fraction) = self.gpu_memory_utilization
            && !(fraction > 0.0 && fraction <= 1.0)
        {
            return Err(Error::invalid_config(
                "extra_config.gpu_memory_utilization",
                format!("is {fraction}; it must be in (0, 1]"),
            ));
        }
        if let Some(backend) = &self.distributed_executor_backend
            && !["mp", "ray", "uni", "external_launcher"].contains(&backend.as_str())
        {
            return Err(Error::invalid_config(
                "extra_config.distributed_executor_backend",
                format!("is {backend:?}; use \"mp\", \"ray\", \"uni\" or \"external_launcher\""),
            ));
        }
        Ok(())
    }
}
