//! The backends under test, configured from the environment xtask sets.

use std::time::Duration;

use runtime_candle::CandleRuntime;
use runtime_core::{ModelRuntime, RuntimeConfig};
use runtime_llamacpp::{LlamaCppOptions, LlamaCppRuntime, LlamaServer};
use runtime_managed::{LaunchSpec, ServerEngine};
use runtime_process::ServerCommand;
use runtime_vllm::{VllmOptions, VllmRuntime, VllmServer};

use crate::{Activity, Backend, EngineProcess, MODEL_ENV, VersionSource, required_env};

/// The context size the suite configures: small enough that an over-long
/// prompt is cheap, large enough that each of llama-server's four slots
/// (512 tokens each) holds a request with a tool list and its call.
pub const CONTEXT_SIZE: u32 = 2048;

/// llama.cpp through the provisioned llama-server and the SmolLM2 GGUF.
pub fn llamacpp() -> Backend {
    let binary = required_env(runtime_llamacpp::BINARY_ENV);
    let config = RuntimeConfig::new(required_env(MODEL_ENV))
        .with_context_size(CONTEXT_SIZE)
        .with_parallel(4)
        .with_threads(2)
        .with_runtime_binary(&binary)
        .with_shutdown_grace(Duration::from_secs(3))
        // The engine's own token counter, which `cancellation` reads.
        .with_options(&LlamaCppOptions::new().with_metrics(true));
    Backend {
        name: "llamacpp",
        new_runtime: || Box::new(LlamaCppRuntime::new()) as Box<dyn ModelRuntime>,
        config,
        server: Some(EngineProcess {
            binary,
            version_source: VersionSource::VersionFlag,
            process_markers: &[],
            command: |config, port| engine_command(&LlamaServer, config, port),
        }),
        start_budget: Duration::from_secs(30),
        exit_budget: Duration::from_secs(1),
        misspelled_option: ("flash_atention", "flash_attention"),
        load_requests: 200,
        activity: Activity::Slots,
        trusted_certificate: None,
        hold_runtime: None,
        shared: None,
    }
}

/// candle in process on the same SmolLM2 GGUF.
pub fn candle() -> Backend {
    let config = RuntimeConfig::new(required_env(MODEL_ENV))
        .with_context_size(CONTEXT_SIZE)
        .with_parallel(4)
        .with_threads(2)
        .with_shutdown_grace(Duration::from_secs(3));
    Backend {
        name: "candle",
        new_runtime: || Box::new(CandleRuntime::new()) as Box<dyn ModelRuntime>,
        config,
        server: None,
        start_budget: Duration::from_secs(30),
        exit_budget: Duration::from_secs(1),
        misspelled_option: ("requantise", "requantize"),
        load_requests: 200,
        activity: Activity::CandleMetrics,
        trusted_certificate: None,
        hold_runtime: None,
        shared: None,
    }
}

/// The variable holding all-MiniLM-L6-v2's sentence-transformers directory.
pub const EMBEDDING_DIR_ENV: &str = "MODEL_RUNTIME_TEST_EMBEDDING_DIR";
/// The variable holding its GGUF conversion (f32).
pub const EMBEDDING_GGUF_ENV: &str = "MODEL_RUNTIME_TEST_EMBEDDING_GGUF";
/// The embedding model's positions: the context its engines are started with.
pub const EMBEDDING_CONTEXT: u32 = 512;

/// llama.cpp, candle and vLLM on all-MiniLM-L6-v2 (the GGUF for llama.cpp,
/// the directory for the others), each with a context of
/// [`EMBEDDING_CONTEXT`].
pub fn embedding_backends() -> Vec<Backend> {
    let dir = required_env(EMBEDDING_DIR_ENV);
    let gguf = required_env(EMBEDDING_GGUF_ENV);
    let mut llama = llamacpp();
    llama.config.model_path = gguf;
    let mut candle = candle();
    candle.config.model_path = dir.clone();
    let mut vllm = vllm();
    // vLLM computes in float32 as the other two and the reference do, so
    // the comparison is of the implementations, not of the precision.
    // vLLM takes sentence-transformers' `max_seq_length` (256) for the
    // model's limit and refuses more unless told; the position table has
    // 512 rows (`max_position_embeddings`), which llama.cpp's conversion and
    // candle use, so all three (and the reference) run 512.
    vllm.config = vllm
        .config
        .clone()
        .with_extra_config("dtype", "float32")
        .with_env("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1");
    vllm.config.model_path = dir;
    let mut backends = vec![llama, candle, vllm];
    for backend in &mut backends {
        backend.config.context_size = Some(EMBEDDING_CONTEXT);
    }
    backends
}

/// The variable holding the Hugging Face directory vLLM runs on.
pub const HF_MODEL_ENV: &str = "MODEL_RUNTIME_TEST_HF_MODEL";

/// vLLM (CPU build) through the provisioned Python on the SmolLM2 safetensors copy.
pub fn vllm() -> Backend {
    let python = required_env(runtime_vllm::PYTHON_ENV);
    let config = RuntimeConfig::new(required_env(HF_MODEL_ENV))
        .with_context_size(CONTEXT_SIZE)
        .with_runtime_binary(&python)
        .with_options(
            &VllmOptions::new()
                .with_enforce_eager(true)
                .with_cpu_kvcache_space_gib(1),
        )
        .with_shutdown_grace(Duration::from_secs(10));
    Backend {
        name: "vllm",
        new_runtime: || Box::new(VllmRuntime::new()) as Box<dyn ModelRuntime>,
        config,
        server: Some(EngineProcess {
            binary: python,
            version_source: VersionSource::HttpVersion,
            process_markers: &["VLLM::", "vllm.entrypoints"],
            command: |config, port| engine_command(&VllmServer, config, port),
        }),
        start_budget: Duration::from_secs(300),
        // The API server shuts EngineCore and its workers down in about 2 s
        // here; a stalled one is killed by the group's watcher after the
        // shutdown grace (10 s).
        exit_budget: Duration::from_secs(15),
        misspelled_option: ("tensor_paralel_size", "tensor_parallel_size"),
        // vLLM's CPU build decodes about 10 tokens/s a stream under this
        // load: 200 requests took six minutes. 64 still overlap 16 at a
        // time, with 16 abandoned.
        load_requests: 64,
        activity: Activity::VllmMetrics,
        trusted_certificate: None,
        hold_runtime: None,
        shared: None,
    }
}

/// The backend called `name`, for `hold-runtime` and the benchmarks.
pub fn by_name(name: &str) -> Option<Backend> {
    match name {
        "llamacpp" => Some(llamacpp()),
        "candle" => Some(candle()),
        "vllm" => Some(vllm()),
        _ => None,
    }
}

/// The command line `engine` would be launched with for `config` on `port`,
/// with a fixed API key.
fn engine_command<E: ServerEngine>(engine: &E, config: &RuntimeConfig, port: u16) -> ServerCommand {
    let binary = engine.find_binary(config).expect("the engine binary");
    let options = config.options::<E::Options>().expect("the engine options");
    engine
        .command(&LaunchSpec::new(
            &binary, config, &options, port, "bench", "bench",
        ))
        .expect("the engine command line")
}
