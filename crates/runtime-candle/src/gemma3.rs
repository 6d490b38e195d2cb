//! Gemma 3 (`general.architecture = gemma3`) on candle's tensor operations
//! and quantized matrix products, which take every GGUF quantization (the
//! real Gemma 3 270M file mixes Q4_K, Q6_K, Q5_0 and Q8_0).
//!
//! The arithmetic is llama.cpp's Gemma 3 graph, not candle-transformers'
//! `quantized_gemma3`, which gates its feed-forward with SiLU where Gemma
//! uses GELU, lets a sliding layer see one key more than its window, and
//! keeps rotary tables for 131,072 positions in every layer:
//!
//! - the token embedding scaled by √d_model;
//! - per layer: RMS norm, attention with RMS-normed queries and keys
//!   (per head), NeoX rotary positions (base 10,000 on sliding layers,
//!   `rope.freq_base` on global ones, whose positions a linear
//!   `rope.scaling.factor` divides), queries scaled by 1/√head_dim (1/√(d/heads) on the
//!   62-layer 27B, as llama.cpp does), a causal mask that on five layers of
//!   six also hides keys `sliding_window` or more positions back, an RMS norm
//!   after attention, then the residual; the feed-forward the same way, with a
//!   tanh-GELU gate;
//! - the output norm and the output matrix (the embedding where the file
//!   ties them). The file's norm weights already hold Gemma's `1 + w`.

use std::io::{Read, Seek};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, gguf_file};
use candle_core::{Device, Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;
use candle_transformers::utils::repeat_kv;
use runtime_core::{Error, Result};

/// Layers in a block of Gemma 3's pattern: the last of each six is global.
const SLIDING_PATTERN: usize = 6;

/// llama.cpp's rotary base of Gemma 3's sliding layers.
const SLIDING_ROPE_BASE: f32 = 10_000.0;

/// The shape of a Gemma 3 model, from its GGUF metadata.
#[derive(Debug, Clone)]
pub(crate) struct Hyper {
    pub(crate) layers: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) embedding: usize,
    pub(crate) context: usize,
    pub(crate) window: usize,
    epsilon: f64,
    rope_base: f32,
    rope_scale: f32,
    query_scale: f64,
}

#[derive(Debug)]
struct Layer {
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attention_norm: RmsNorm,
    post_attention_norm: RmsNorm,
    ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
    sliding: bool,
}

/// Gemma 3's weights, shared by every slot.
#[derive(Debug)]
pub(crate) struct Gemma3 {
    pub(crate) hyper: Hyper,
    embedding: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
}

/// Whether the GGUF's metadata names Gemma 3.
pub(crate) fn is_gemma3(content: &gguf_file::Content) -> bool {
    content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .is_some_and(|arch| arch == "gemma3")
}

impl Gemma3 {
    /// Reads the model from a GGUF whose architecture is `gemma3`.
    pub(crate) fn load<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        path: &Path,
    ) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidModel {
            path: path.to_owned(),
            reason,
        };
        let value = |key: &str| {
            content
                .metadata
                .get(&format!("gemma3.{key}"))
                .ok_or_else(|| invalid(format!("the Gemma 3 GGUF has no `gemma3.{key}`")))
        };
        let count = |key: &str| -> Result<usize> {
            value(key)?
                .to_u32()
                .map(|n| n as usize)
                .map_err(|err| invalid(format!("`gemma3.{key}`: {err}")))
        };
        let float = |key: &str| -> Result<f32> {
            value(key)?
                .to_f32()
                .map_err(|err| invalid(format!("`gemma3.{key}`: {err}")))
        };
        let layers = count("block_count")?;
        let heads = count("attention.head_count")?;
        let kv_heads = count("attention.head_count_kv")?;
        let head_dim = count("attention.key_length")?;
        let embedding = count("embedding_length")?;
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(invalid(format!(
                "{heads} query heads do not share {kv_heads} key-value heads evenly"
            )));
        }
        // llama.cpp: the 27B scales queries by its width per head, the
        // others by their head size.
        let query_width = if layers == 62 {
            embedding / heads
        } else {
            head_dim
        };
        let hyper = Hyper {
            layers,
            heads,
            kv_heads,
            head_dim,
            embedding,
            context: count("context_length")?,
            window: count("attention.sliding_window")?,
            epsilon: f64::from(float("attention.layer_norm_rms_epsilon")?),
            rope_base: float("rope.freq_base")?,
            rope_scale: float("rope.scaling.factor").unwrap_or(1.0),
            query_scale: 1.0 / (query_width as f64).sqrt(),
        };
        let device = Device::Cpu;
        let mut tensor = |name: &str| {
            content
                .tensor(reader, name, &device)
                .map_err(|err| invalid(format!("tensor `{name}`: {err}")))
        };
        let norm = |tensor: candle_core::quantized::QTensor, name: &str| {
            RmsNorm::from_qtensor(tensor, hyper.epsilon)
                .map_err(|err| invalid(format!("norm `{name}`: {err}")))
        };
        let matmul = |tensor: candle_core::quantized::QTensor, name: &str| {
            QMatMul::from_qtensor(tensor).map_err(|err| invalid(format!("matrix `{name}`: {err}")))
        };
        // Read once: where the file ties them, the output matrix is the embedding.
        let embedding_tensor = Arc::new(tensor("token_embd.weight")?);
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => matmul(tensor("output.weight")?, "output.weight")?,
            false => QMatMul::from_arc(embedding_tensor.clone())
                .map_err(|err| invalid(format!("matrix `token_embd.weight`: {err}")))?,
        };
        let embedding_table = embedding_tensor
            .dequantize(&device)
            .map_err(|err| invalid(format!("token embeddings: {err}")))?;
        let mut weights = Vec::with_capacity(layers);
        for layer in 0..layers {
            let mut named = |suffix: &str| {
                let name = format!("blk.{layer}.{suffix}.weight");
                tensor(&name).map(|t| (t, name))
            };
            let mut m = |suffix: &str| -> Result<QMatMul> {
                let (t, name) = named(suffix)?;
                matmul(t, &name)
            };
            let (q, k, v, o) = (m("attn_q")?, m("attn_k")?, m("attn_v")?, m("attn_output")?);
            let (gate, up, down) = (m("ffn_gate")?, m("ffn_up")?, m("ffn_down")?);
            let mut n = |suffix: &str| -> Result<RmsNorm> {
                let (t, name) = named(suffix)?;
                norm(t, &name)
            };
            weights.push(Layer {
                q,
                k,
                v,
                o,
                q_norm: n("attn_q_norm")?,
                k_norm: n("attn_k_norm")?,
                attention_norm: n("attn_norm")?,
                post_attention_norm: n("post_attention_norm")?,
                ffn_norm: n("ffn_norm")?,
                post_ffn_norm: n("post_ffw_norm")?,
                gate,
                up,
                down,
                sliding: layer % SLIDING_PATTERN < SLIDING_PATTERN - 1,
            });
        }
        let norm = norm(tensor("output_norm.weight")?, "output_norm.weight")?;
        Ok(Self {
            hyper,
            embedding: embedding_table,
            layers: weights,
            norm,
            output,
        })
    }
}

/// One slot over Gemma 3: the shared weights and this sequence's keys and
/// values, per layer.
#[derive(Debug)]
pub(crate) struct Gemma3Session {
    model: Arc<Gemma3>,
    cache: Vec<Option<(Tensor, Tensor)>>,
}

impl Gemma3Session {
    pub(crate) fn new(model: Arc<Gemma3>) -> Self {
        let cache = (0..model.layers.len()).map(|_| None).collect();
        Self { model, cache }
    }

    /// Forgets the sequence.
    pub(crate) fn reset(&mut self) {
        self.cache.iter_mut().for_each(|entry| *entry = None);
    }

    /// Logits (`[1, vocabulary]`) for the token after `tokens` (`[1, n]`),
    /// which start at `position`; an earlier position than the cache holds
    /// rewinds to it.
    pub(crate) fn forward(
        &mut self,
        tokens: &Tensor,
        position: usize,
    ) -> candle_core::Result<Tensor> {
        let model = self.model.clone();
        let hyper = &model.hyper;
        let (batch, count) = tokens.dims2()?;
        let cached = self.cache[0]
            .as_ref()
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0));
        if position < cached {
            for entry in &mut self.cache {
                *entry = match entry.take() {
                    Some((k, v)) if position > 0 => {
                        Some((k.narrow(2, 0, position)?, v.narrow(2, 0, position)?))
                    }
                    _ => None,
                };
            }
        } else if position > cached {
            candle_core::bail!("position {position} skips past the {cached} cached positions");
        }
        let ids = tokens.flatten_all()?;
        let mut x =
            model
                .embedding
                .index_select(&ids, 0)?
                .reshape((batch, count, hyper.embedding))?;
        x = (x * (hyper.embedding as f64).sqrt())?;
        let total = position + count;
        let (sliding_rope, global_rope) = (
            rotary(hyper.head_dim, SLIDING_ROPE_BASE, 1.0, position, count)?,
            rotary(
                hyper.head_dim,
                hyper.rope_base,
                hyper.rope_scale,
                position,
                count,
            )?,
        );
        let (sliding_mask, global_mask) = (
            mask(position, count, Some(hyper.window))?,
            mask(position, count, None)?,
        );
        for (layer, cache) in model.layers.iter().zip(&mut self.cache) {
            let (rope, mask) = match layer.sliding {
                true => (&sliding_rope, &sliding_mask),
                false => (&global_rope, &global_mask),
            };
            let h = layer.attention_norm.forward(&x)?;
            let heads = |m: &QMatMul, n: usize| -> candle_core::Result<Tensor> {
                m.forward(&h)?
                    .reshape((batch, count, n, hyper.head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = layer.q_norm.forward(&heads(&layer.q, hyper.heads)?)?;
            let k = layer.k_norm.forward(&heads(&layer.k, hyper.kv_heads)?)?;
            let v = heads(&layer.v, hyper.kv_heads)?;
            let q = candle_nn::rotary_emb::rope(&q, &rope.0, &rope.1)?;
            let k = candle_nn::rotary_emb::rope(&k, &rope.0, &rope.1)?;
            let (k, v) = match cache.take() {
                Some((past_k, past_v)) => (
                    Tensor::cat(&[&past_k, &k], 2)?,
                    Tensor::cat(&[&past_v, &v], 2)?,
                ),
                None => (k, v),
            };
            *cache = Some((k.clone(), v.clone()));
            debug_assert_eq!(k.dim(2)?, total);
            let groups = hyper.heads / hyper.kv_heads;
            let k = repeat_kv(k, groups)?.contiguous()?;
            let v = repeat_kv(v, groups)?.contiguous()?;
            let scores = ((q * hyper.query_scale)?.matmul(&k.t()?)?).broadcast_add(mask)?;
            let weights = candle_nn::ops::softmax_last_dim(&scores)?;
            let attended = weights.matmul(&v)?.transpose(1, 2)?.reshape((
                batch,
                count,
                hyper.heads * hyper.head_dim,
            ))?;
            let attended = layer
                .post_attention_norm
                .forward(&layer.o.forward(&attended)?)?;
            x = (x + attended)?;
            let h = layer.ffn_norm.forward(&x)?;
            let gated = (layer.gate.forward(&h)?.gelu()? * layer.up.forward(&h)?)?;
            let ffn = layer.post_ffn_norm.forward(&layer.down.forward(&gated)?)?;
            x = (x + ffn)?;
        }
        let last = x.narrow(1, count - 1, 1)?.squeeze(1)?;
        let last = model.norm.forward(&last)?;
        model.output.forward(&last)
    }
}

/// NeoX rotary tables (`[count, head_dim / 2]`) for positions `start..`,
/// divided by `scale` (a linear rope scaling).
fn rotary(
    head_dim: usize,
    base: f32,
    scale: f32,
    start: usize,
    count: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let frequencies: Vec<f32> = (0..half)
        .map(|i| base.powf(-2.0 * i as f32 / head_dim as f32))
        .collect();
    let mut angles = Vec::with_capacity(count * half);
    for position in start..start + count {
        let position = position as f32 / scale;
        angles.extend(frequencies.iter().map(|frequency| position * frequency));
    }
    let angles = Tensor::from_vec(angles, (count, half), &Device::Cpu)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// The additive attention mask (`[count, start + count]`) of queries at
/// `start..start + count`: a key after its query is hidden, and with a
/// `window`, a key `window` or more positions before it.
fn mask(start: usize, count: usize, window: Option<usize>) -> candle_core::Result<Tensor> {
    let total = start + count;
    let mut values = Vec::with_capacity(count * total);
    for query in start..total {
        for key in 0..total {
            let visible = key <= query && window.is_none_or(|w| query - key < w);
            values.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
        }
    }
    Tensor::from_vec(values, (count, total), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(mask: &Tensor) -> Vec<Vec<bool>> {
        mask.to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|row| row.into_iter().map(f32::is_finite).collect())
            .collect()
    }

    #[test]
    fn a_sliding_layer_sees_exactly_its_window_of_keys() {
        // Queries at 3 and 4, a window of 2: each sees itself and one before.
        let seen = visible(&mask(3, 2, Some(2)).unwrap());
        assert_eq!(
            seen,
            vec![
                vec![false, false, true, true, false],
                vec![false, false, false, true, true],
            ]
        );
    }

    #[test]
    fn a_global_layer_sees_every_earlier_key() {
        let seen = visible(&mask(2, 1, None).unwrap());
        assert_eq!(seen, vec![vec![true, true, true]]);
    }

    #[test]
    fn rotary_angles_grow_with_position_and_shrink_with_frequency() {
        let (cos, sin) = rotary(4, 10_000.0, 1.0, 5, 1).unwrap();
        let (cos, sin) = (cos.to_vec2::<f32>().unwrap(), sin.to_vec2::<f32>().unwrap());
        // Pair 0 turns by the position itself, pair 1 by position / 100.
        assert!((cos[0][0] - 5f32.cos()).abs() < 1e-6);
        assert!((sin[0][1] - 0.05f32.sin()).abs() < 1e-6);
        let (scaled, _) = rotary(4, 10_000.0, 8.0, 8, 1).unwrap();
        assert!((scaled.to_vec2::<f32>().unwrap()[0][0] - 1f32.cos()).abs() < 1e-6);
    }
}
