//! Sampling: the request's temperature, top-p and seed, as candle's logits
//! processor takes them.

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use runtime_core::{Error, InferenceRequest, Result};

pub(crate) fn sampling_of(request: &InferenceRequest) -> Sampling {
    let temperature = f64::from(request.temperature.unwrap_or(0.8));
    if temperature <= 0.0 {
        return Sampling::ArgMax;
    }
    match request.top_p {
        Some(p) if p < 1.0 => Sampling::TopP {
            p: f64::from(p),
            temperature,
        },
        _ => Sampling::All { temperature },
    }
}

pub(crate) fn sample(sampler: &mut LogitsProcessor, logits: &[f32]) -> Result<u32> {
    let logits = Tensor::from_slice(logits, logits.len(), &Device::Cpu)
        .map_err(|err| Error::engine("error holding the logits", err))?;
    sampler
        .sample(&logits)
        .map_err(|err| Error::engine("error sampling", err))
}

pub(crate) fn random_seed() -> Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|err| {
        Error::io(
            "error drawing a seed",
            std::io::Error::other(err.to_string()),
        )
    })?;
    Ok(u64::from_le_bytes(bytes))
}
