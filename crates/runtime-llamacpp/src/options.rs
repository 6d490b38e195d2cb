//! [`LlamaCppOptions`]: what llama.cpp takes beyond [`RuntimeConfig`](runtime_core::RuntimeConfig).

use runtime_core::{BackendOptions, Error, Result};
use serde::{Deserialize, Serialize};

/// llama-server's own settings, beyond the fields of
/// [`RuntimeConfig`](runtime_core::RuntimeConfig).
///
/// Set from code with [`RuntimeConfig::with_options`](runtime_core::RuntimeConfig::with_options),
/// or as the same keys in `extra_config` (a configuration file). Unset fields
/// leave llama-server's defaults.
///
/// ```
/// use runtime_core::RuntimeConfig;
/// use runtime_llamacpp::{FlashAttention, LlamaCppOptions};
///
/// let options = LlamaCppOptions::new()
///     .with_flash_attention(FlashAttention::On)
///     .with_metrics(true);
/// let config = RuntimeConfig::new("model.gguf").with_options(&options);
/// assert_eq!(config.options::<LlamaCppOptions>().unwrap(), options);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LlamaCppOptions {
    /// Flash attention (`--flash-attn`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flash_attention: Option<FlashAttention>,
    /// The KV cache's data type for keys (`--cache-type-k`: `f16`, `q8_0`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_type_k: Option<String>,
    /// The KV cache's data type for values (`--cache-type-v`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_type_v: Option<String>,
    /// The physical batch size in tokens (`--ubatch-size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ubatch_size: Option<u32>,
    /// How the model file is loaded (`--load-mode`: `auto`, `none`, `mmap`,
    /// `mlock`, `mmap+mlock`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_mode: Option<String>,
    /// Serve Prometheus metrics at `/metrics` (`--metrics`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub metrics: bool,
    /// RPC workers (`host:port`, each a `rpc-server`) the model is split
    /// across (`--rpc`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rpc_workers: Vec<String>,
    /// The fraction of the model for each device, in order (`--tensor-split`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tensor_split: Vec<f32>,
}

/// llama-server's `--flash-attn` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FlashAttention {
    /// Always.
    On,
    /// Never.
    Off,
    /// Where the device supports it.
    Auto,
}

impl FlashAttention {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
            Self::Auto => "auto",
        }
    }
}

impl LlamaCppOptions {
    /// Every option at llama-server's default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`flash_attention`](Self::flash_attention).
    #[must_use]
    pub fn with_flash_attention(mut self, value: FlashAttention) -> Self {
        self.flash_attention = Some(value);
        self
    }

    /// Sets [`cache_type_k`](Self::cache_type_k) and [`cache_type_v`](Self::cache_type_v).
    #[must_use]
    pub fn with_cache_types(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.cache_type_k = Some(k.into());
        self.cache_type_v = Some(v.into());
        self
    }

    /// Sets [`ubatch_size`](Self::ubatch_size).
    #[must_use]
    pub fn with_ubatch_size(mut self, value: u32) -> Self {
        self.ubatch_size = Some(value);
        self
    }

    /// Sets [`load_mode`](Self::load_mode).
    #[must_use]
    pub fn with_load_mode(mut self, value: impl Into<String>) -> Self {
        self.load_mode = Some(value.into());
        self
    }

    /// Sets [`metrics`](Self::metrics).
    #[must_use]
    pub fn with_metrics(mut self, value: bool) -> Self {
        self.metrics = value;
        self
    }

    /// Adds an RPC worker (`host:port`) to [`rpc_workers`](Self::rpc_workers).
    #[must_use]
    pub fn with_rpc_worker(mut self, address: impl Into<String>) -> Self {
        self.rpc_workers.push(address.into());
        self
    }

    /// Sets [`tensor_split`](Self::tensor_split).
    #[must_use]
    pub fn with_tensor_split(mut self, fractions: impl Into<Vec<f32>>) -> Self {
        self.tensor_split = fractions.into();
        self
    }
}

impl BackendOptions for LlamaCppOptions {
    const BACKEND: &'static str = "llama.cpp";

    fn validate(&self) -> Result<()> {
        if self.ubatch_size == Some(0) {
            return Err(Error::invalid_config(
                "extra_config.ubatch_size",
                "must be at least 1 (leave it unset for the default)",
            ));
        }
        if let Some(worker) = self.rpc_workers.iter().find(|w| !is_host_port(w)) {
            return Err(Error::invalid_config(
                "extra_config.rpc_workers",
                format!("has {worker:?}, which is not host:port"),
            ));
        }
        if self.tensor_split.iter().any(|f| !f.is_finite() || *f < 0.0) {
            return Err(Error::invalid_config(
                "extra_config.tensor_split",
                "must hold finite, non-negative fractions",
            ));
        }
        Ok(())
    }
}

fn is_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}
