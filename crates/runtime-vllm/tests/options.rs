//! Options reach `initialize` typed: a typo fails before anything starts.

use runtime_core::{Error, ModelRuntime, RuntimeConfig};
use runtime_vllm::VllmRuntime;

#[tokio::test]
async fn a_misspelled_option_fails_initialize_before_anything_starts() {
    let mut runtime = VllmRuntime::new();
    // No model and no vLLM are needed: the options are read first.
    let config = RuntimeConfig::new("/nonexistent/model")
        .with_runtime_binary("/nonexistent/python")
        .with_extra_config("tensor_paralel_size", 2);
    let err = runtime.initialize(config).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig { field, .. } if field == "extra_config.tensor_paralel_size"),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("did you mean `tensor_parallel_size`?"),
        "{message}"
    );
    assert!(message.contains("`pipeline_parallel_size`"), "{message}");
    assert!(!runtime.is_ready().await);
}
