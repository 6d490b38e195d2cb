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
    /// Which CPUs each rank's threads run on, for the CPU build
    /// (`VLLM_CPU_OMP_THREADS_BIND`, ranks separated by `|`: `"0-3|4-7"`).
    /// Derived from the CPUs we may use when there are several ranks and
    /// this is unset: the CPU build refuses several ranks without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_omp_threads_bind: Option<String>,
    /// Nodes the ranks span (`--nnodes`); more than one needs the `mp`
    /// executor, `master_addr`, and on every node but the first a
    /// [`VllmHeadlessRank`](crate::VllmHeadlessRank).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nnodes: Option<u32>,
    /// This node's rank among them (`--node-rank`; 0 serves the API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_rank: Option<u32>,
    /// The first node's address, where ranks meet (`--master-addr`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_addr: Option<String>,
    /// The port ranks meet on (`--master-port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_port: Option<u16>,
    /// How vLLM reads `auto` tool calls out of the model's output
    /// (`--tool-call-parser`); unset, the default for the model's family
    /// ([`ToolCallParser::for_model`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_parser: Option<ToolCallParser>,
}

/// vLLM's readers of tool calls out of generated text, the ones whose
/// format fits the common chat templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ToolCallParser {
    /// `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (Hermes,
    /// Qwen 2.5 and 3, and any model told so by our system note).
    Hermes,
    /// A bare `{"name": ..., "parameters": ...}` (Llama 3.1 and later).
    #[serde(rename = "llama3_json")]
    Llama3Json,
    /// `[TOOL_CALLS][...]` (Mistral).
    Mistral,
    /// `<|tool_call|>[...]` (Granite 3).
    Granite,
}

impl ToolCallParser {
    /// The name vLLM knows it by.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3Json => "llama3_json",
            Self::Mistral => "mistral",
            Self::Granite => "granite",
        }
    }

    /// The parser that fits a model: its family (`model_type` in
    /// `config.json`) when its chat template renders tools in that family's
    /// format, else Hermes tags, which is what the tool note written for a
    /// template without tools asks for.
    pub fn for_model(model_type: Option<&str>, template_renders_tools: bool) -> Self {
        if !template_renders_tools {
            return Self::Hermes;
        }
        match model_type {
            Some("mistral" | "mixtral") => Self::Mistral,
            Some("granite") => Self::Granite,
            Some("llama") => Self::Llama3Json,
            _ => Self::Hermes,
        }
    }
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

    /// Sets [`cpu_omp_threads_bind`](Self::cpu_omp_threads_bind).
    #[must_use]
    pub fn with_cpu_omp_threads_bind(mut self, bind: impl Into<String>) -> Self {
        self.cpu_omp_threads_bind = Some(bind.into());
        self
    }

    /// Spreads the ranks over `nnodes` nodes, this one being `node_rank`,
    /// meeting at `master_addr:master_port`.
    #[must_use]
    pub fn with_nodes(
        mut self,
        nnodes: u32,
        node_rank: u32,
        master_addr: impl Into<String>,
        master_port: u16,
    ) -> Self {
        self.nnodes = Some(nnodes);
        self.node_rank = Some(node_rank);
        self.master_addr = Some(master_addr.into());
        self.master_port = Some(master_port);
        self
    }

    /// Ranks in all: tensor × pipeline parallelism.
    pub fn world_size(&self) -> u32 {
        self.tensor_parallel_size.unwrap_or(1) * self.pipeline_parallel_size.unwrap_or(1)
    }

    /// Sets [`tool_call_parser`](Self::tool_call_parser).
    #[must_use]
    pub fn with_tool_call_parser(mut self, parser: ToolCallParser) -> Self {
        self.tool_call_parser = Some(parser);
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
        let nnodes = self.nnodes.unwrap_or(1);
        if nnodes == 0 {
            return Err(Error::invalid_config(
                "extra_config.nnodes",
                "must be at least 1",
            ));
        }
        if let Some(rank) = self.node_rank
            && rank >= nnodes
        {
            return Err(Error::invalid_config(
                "extra_config.node_rank",
                format!("is {rank}; with {nnodes} nodes it must be below {nnodes}"),
            ));
        }
        if nnodes > 1 {
            if self.master_addr.is_none() {
                return Err(Error::invalid_config(
                    "extra_config.master_addr",
                    format!("is needed with {nnodes} nodes: the first node's address"),
                ));
            }
            if !self.world_size().is_multiple_of(nnodes) {
                return Err(Error::invalid_config(
                    "extra_config.nnodes",
                    format!(
                        "is {nnodes}, which does not divide the {} ranks \
                         (tensor_parallel_size × pipeline_parallel_size)",
                        self.world_size()
                    ),
                ));
            }
            if self
                .distributed_executor_backend
                .as_deref()
                .is_some_and(|b| b != "mp")
            {
                return Err(Error::invalid_config(
                    "extra_config.distributed_executor_backend",
                    "must be \"mp\" across nodes started with nnodes (a Ray cluster \
                     spans nodes by itself: leave nnodes unset)",
                ));
            }
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
