//! [`CandleOptions`]: what the candle engine takes beyond [`RuntimeConfig`](runtime_core::RuntimeConfig).

use runtime_core::{BackendOptions, Error, MAX_QUEUE, Result};
use serde::{Deserialize, Serialize};

use crate::Requantize;

/// The candle engine's own settings, beyond the fields of
/// [`RuntimeConfig`](runtime_core::RuntimeConfig) (`threads` sizes the compute
/// threads, `parallel` the slots: requests generated at once).
///
/// ```
/// use runtime_candle::{CandleOptions, Requantize};
/// use runtime_core::RuntimeConfig;
///
/// let options = CandleOptions::new().with_queue(4).with_requantize(Requantize::Q8_0);
/// let config = RuntimeConfig::new("model.gguf").with_options(&options);
/// assert_eq!(config.options::<CandleOptions>().unwrap(), options);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CandleOptions {
    /// Requests that may wait for a free slot before new ones are refused
    /// with [`Error::Busy`] (default 16).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    /// The precision of the KV cache of our own forward pass (default f16).
    #[serde(skip_serializing_if = "is_default_cache")]
    pub kv_cache: CacheType,
    /// Re-quantize Q4_1 tensors on load (default: keep the file's). Lossy,
    /// and no faster on this crate's own kernels, which take Q4_1 as it is.
    #[serde(skip_serializing_if = "is_keep")]
    pub requantize: Requantize,
}

fn is_default_cache(cache: &CacheType) -> bool {
    *cache == CacheType::default()
}

/// The precision of the KV cache of the crate's own forward pass (models on
/// candle's implementations keep theirs in f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CacheType {
    /// Half the memory, and half the memory to read per generated token,
    /// which is what decoding past a few hundred positions waits for;
    /// llama.cpp's default too.
    #[default]
    F16,
    /// Exact: the choice for comparing with another engine's f32 cache.
    F32,
}

fn is_keep(requantize: &Requantize) -> bool {
    *requantize == Requantize::Keep
}

impl CandleOptions {
    /// Every option at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`queue`](Self::queue).
    #[must_use]
    pub fn with_queue(mut self, waiting: u32) -> Self {
        self.queue = Some(waiting);
        self
    }

    /// Sets [`kv_cache`](Self::kv_cache).
    #[must_use]
    pub fn with_kv_cache(mut self, cache: CacheType) -> Self {
        self.kv_cache = cache;
        self
    }

    /// Sets [`requantize`](Self::requantize).
    #[must_use]
    pub fn with_requantize(mut self, requantize: Requantize) -> Self {
        self.requantize = requantize;
        self
    }
}

impl BackendOptions for CandleOptions {
    const BACKEND: &'static str = "candle";

    fn validate(&self) -> Result<()> {
        match self.queue {
            Some(0) => Err(Error::invalid_config(
                "extra_config.queue",
                "must be at least 1 (leave it unset for the default)",
            )),
            Some(waiting) if waiting > MAX_QUEUE => Err(Error::invalid_config(
                "extra_config.queue",
                format!("is {waiting}; at most {MAX_QUEUE} requests may wait"),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use runtime_core::RuntimeConfig;

    use super::*;

    #[test]
    fn requantize_is_read_by_its_lowercase_name() {
        let config = RuntimeConfig::new("m.gguf").with_extra_config("requantize", "q4_0");
        assert_eq!(
            config.options::<CandleOptions>().unwrap().requantize,
            Requantize::Q4_0
        );
        let bad = RuntimeConfig::new("m.gguf").with_extra_config("requantize", "q2_k");
        assert!(bad.options::<CandleOptions>().is_err());
    }

    #[test]
    fn the_cache_type_is_read_by_its_lowercase_name_and_defaults_to_f16() {
        let config = RuntimeConfig::new("m.gguf").with_extra_config("kv_cache", "f32");
        assert_eq!(
            config.options::<CandleOptions>().unwrap().kv_cache,
            CacheType::F32
        );
        let default = RuntimeConfig::new("m.gguf")
            .options::<CandleOptions>()
            .unwrap();
        assert_eq!(default.kv_cache, CacheType::F16);
        let bad = RuntimeConfig::new("m.gguf").with_extra_config("kv_cache", "q8_0");
        assert!(bad.options::<CandleOptions>().is_err());
    }

    #[test]
    fn a_queue_past_its_limit_is_refused() {
        let config = RuntimeConfig::new("m.gguf").with_extra_config("queue", u64::from(u32::MAX));
        let err = config.options::<CandleOptions>().unwrap_err();
        assert!(err.to_string().contains("4096"), "{err}");
    }

    #[test]
    fn a_misspelled_option_names_the_closest_key() {
        let config = RuntimeConfig::new("m.gguf").with_extra_config("requantise", "q8_0");
        let err = config.options::<CandleOptions>().unwrap_err().to_string();
        assert!(err.contains("did you mean `requantize`?"), "{err}");
    }
}
