//! Options reach `initialize` typed: a typo fails before anything starts.

use runtime_core::{Error, ModelRuntime, RuntimeConfig};
use runtime_llamacpp::LlamaCppRuntime;

#[tokio::test]
async fn a_misspelled_option_fails_initialize_before_anything_starts() {
    let mut runtime = LlamaCppRuntime::new();
    // No model and no llama-server are needed: the options are read first.
    let config = RuntimeConfig::new("/nonexistent/model.gguf")
        .with_runtime_binary("/nonexistent/llama-server")
        .with_extra_config("flash_atention", "on");
    let err = runtime.initialize(config).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig { field, .. } if field == "extra_config.flash_atention"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("did you mean `flash_attention`?"),
        "{err}"
    );
    assert!(!runtime.is_ready().await);
}
