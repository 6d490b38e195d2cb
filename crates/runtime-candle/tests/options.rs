//! Options reach `initialize` typed: a typo fails before anything loads.

use runtime_candle::CandleRuntime;
use runtime_core::{Error, ModelRuntime, RuntimeConfig};

#[tokio::test]
async fn a_misspelled_option_fails_initialize_before_anything_loads() {
    let mut runtime = CandleRuntime::new();
    let config =
        RuntimeConfig::new("/nonexistent/model.gguf").with_extra_config("requantise", "q8_0");
    let err = runtime.initialize(config).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig { field, .. } if field == "extra_config.requantise"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("did you mean `requantize`?"),
        "{err}"
    );
    assert!(!runtime.is_ready().await);
}
