//! [`Forward`]: the forward pass over a batch of [`Step`]s, with the slots'
//! caches, the buffers and the compute threads it owns.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use runtime_core::{Error, Result};

use super::Step;
use super::cache::{Caches, SlotCache};
use super::gguf::{GgufLlama, Matrix};
use super::pool::Pool;
use crate::CacheType;
use crate::kernels::{CacheValue, GROUP, HeadCache, Kernels, Quantized, math};

/// Buffers of one forward pass, kept between passes.
#[derive(Debug, Default)]
pub(super) struct Scratch {
    /// (slot, position) of each token of the batch.
    pub(super) tokens: Vec<(usize, usize)>,
    /// Cosines and sines of each token's rotary angles, interleaved.
    pub(super) rope: Vec<f32>,
    /// The residual stream, `tokens × embedding`.
    pub(super) x: Vec<f32>,
    pub(super) normed: Vec<f32>,
    pub(super) acts: Quantized,
    pub(super) qkv: Vec<f32>,
    pub(super) attention: Vec<f32>,
    pub(super) projected: Vec<f32>,
    pub(super) gate_up: Vec<f32>,
    pub(super) transposed: Vec<f32>,
    /// Which tokens' logits are wanted.
    pub(super) last: Vec<usize>,
    pub(super) logits: Vec<f32>,
}

/// The mutable half of the model: the slots' KV caches, the buffers and the
/// compute threads, owned by the one thread that runs the engine.
#[derive(Debug)]
pub(crate) struct Forward {
    pub(super) model: Arc<GgufLlama>,
    pub(super) pool: Pool,
    pub(super) slots: Caches,
    pub(super) scratch: Scratch,
    pub(super) stop: Arc<AtomicBool>,
}

thread_local! {
    /// Each compute thread's attention scores.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Forward {
    /// Slots for `slots` sequences, computed on `threads` threads; a forward
    /// pass ends early with [`Error::ShutDown`] once `stop` is set.
    pub(crate) fn new(
        model: Arc<GgufLlama>,
        slots: usize,
        threads: usize,
        cache: CacheType,
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        let pool = Pool::new(threads)
            .map_err(|err| Error::io("error starting the compute threads", err))?;
        let slots = Caches::new(cache, slots, model.hyper.layers);
        Ok(Self {
            model,
            pool,
            slots,
            scratch: Scratch::default(),
            stop,
        })
    }

    /// Frees what `slot` holds beyond a small reserve.
    pub(crate) fn release(&mut self, slot: usize) {
        const KEEP_POSITIONS: usize = 1024;
        let keep = KEEP_POSITIONS * self.model.hyper.kv_dim();
        self.slots.release(slot, keep);
    }

    /// Runs `steps` (each slot at most once) and returns the logits wanted,
    /// `vocab` values per step that asked, in order.
    pub(crate) fn forward(&mut self, steps: &[Step<'_>]) -> Result<&[f32]> {
        let h = self.model.hyper.clone();
        self.prepare(steps)?;
        let Self {
            model,
            pool,
            slots,
            scratch,
            stop,
        } = self;
        let model = &**model;
        let n = scratch.tokens.len();
        let (e, qd, kvd, f) = (h.embedding, h.q_dim(), h.kv_dim(), h.feed_forward);
        let qkv_width = qd + 2 * kvd;

        // Embeddings.
        scratch.x.resize(n * e, 0.0);
        let tokens = steps.iter().flat_map(|s| s.tokens);
        for (token, x) in tokens.zip(scratch.x.chunks_exact_mut(e)) {
            model.embeddings.dequantize_row(*token as usize, x);
        }
        scratch.normed.resize(n * e, 0.0);
        scratch.qkv.resize(n * qkv_width, 0.0);
        scratch.attention.resize(n * qd, 0.0);
        scratch.projected.resize(n * e, 0.0);
        scratch.gate_up.resize(n * 2 * f, 0.0);

        for (index, layer) in model.layers.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Err(Error::ShutDown);
            }
            // Attention.
            norm_and_quantize(
                &scratch.x,
                &layer.attn_norm,
                h.rms_eps,
                e,
                &mut scratch.normed,
                &mut scratch.acts,
            );
            let qkv = [&layer.qkv[0], &layer.qkv[1], &layer.qkv[2]];
            matmul(
                pool,
                &model.kernels,
                &qkv,
                &scratch.acts,
                e,
                n,
                &mut scratch.qkv,
                &mut scratch.transposed,
            );
            match slots {
                Caches::F16(slots) => store_and_attend(pool, model, index, slots, scratch),
                Caches::F32(slots) => store_and_attend(pool, model, index, slots, scratch),
            }
            scratch.acts.clear();
            for row in scratch.attention.chunks_exact(qd) {
                scratch.acts.push(row);
            }
            matmul(
                pool,
                &model.kernels,
                &[&layer.output],
                &scratch.acts,
                qd,
                n,
                &mut scratch.projected,
                &mut scratch.transposed,
            );
            add(&mut scratch.x, &scratch.projected);

            // Feed-forward.
            norm_and_quantize(
                &scratch.x,
                &layer.ffn_norm,
                h.rms_eps,
                e,
                &mut scratch.normed,
                &mut scratch.acts,
            );
            let gate_up = [&layer.gate_up[0], &layer.gate_up[1]];
            matmul(
                pool,
                &model.kernels,
                &gate_up,
                &scratch.acts,
                e,
                n,
                &mut scratch.gate_up,
                &mut scratch.transposed,
            );
            scratch.acts.clear();
            for row in scratch.gate_up.chunks_exact_mut(2 * f) {
                let (gate, up) = row.split_at_mut(f);
                math::silu_mul(gate, up);
                scratch.acts.push(gate);
            }
            matmul(
                pool,
                &model.kernels,
                &[&layer.down],
                &scratch.acts,
                f,
                n,
                &mut scratch.projected,
                &mut scratch.transposed,
            );
            add(&mut scratch.x, &scratch.projected);
        }

        // Logits of the last token of each step that wants them.
        let wanted = scratch.last.len();
        scratch.normed.resize(wanted * e, 0.0);
        scratch.acts.clear();
        for (i, &t) in scratch.last.iter().enumerate() {
            let normed = &mut scratch.normed[i * e..(i + 1) * e];
            math::rms_norm(
                &scratch.x[t * e..(t + 1) * e],
                &model.output_norm,
                h.rms_eps,
                normed,
            );
            scratch.acts.push(normed);
        }
        scratch.logits.resize(wanted * h.vocab, 0.0);
        let output = model.output.as_ref().unwrap_or(&model.embeddings);
        matmul(
            pool,
            &model.kernels,
            &[output],
            &scratch.acts,
            e,
            wanted,
            &mut scratch.logits,
            &mut scratch.transposed,
        );
        Ok(&scratch.logits)
    }

    /// Checks the steps and lays out the batch: each token's slot and
    /// position, rotary angles, and which logits are wanted.
    pub(super) fn prepare(&mut self, steps: &[Step<'_>]) -> Result<()> {
        let h = &self.model.hyper;
        let scratch = &mut self.scratch;
        scratch.tokens.clear();
        scratch.last.clear();
        for (i, step) in steps.iter().enumerate() {
            if step.slot >= self.slots.slots() || steps[..i].iter().any(|s| s.slot == step.slot) {
                return Err(Error::engine(
                    "a batch names a slot twice or one that does not exist",
                    std::io::Error::other(format!("slot {}", step.slot)),
                ));
            }
            let cached = self.slots.positions(step.slot, h.kv_dim());
            if step.position > cached
                || step.position + step.tokens.len() > h.context
                || step.tokens.is_empty()
            {
                return Err(Error::engine(
                    "a batch step does not continue its sequence within the context",
                    std::io::Error::other(format!(
                        "position {} of {cached} cached, {} tokens, context {}",
                        step.position,
                        step.tokens.len(),
                        h.context
                    )),
                ));
            }
            if let Some(token) = step.tokens.iter().find(|&&t| t as usize >= h.vocab) {
                return Err(Error::engine(
                    "a token is outside the model's vocabulary",
                    std::io::Error::other(format!("token {token} of {}", h.vocab)),
                ));
            }
            for offset in 0..step.tokens.len() {
                scratch.tokens.push((step.slot, step.position + offset));
            }
            if step.logits {
                scratch.last.push(scratch.tokens.len() - 1);
            }
        }
        // Rotary angles as ggml computes them: θ = p, then θ ×= base^(-2/d) per pair.
        let theta_scale = h.rope_base.powf(-2.0 / h.head_dim as f32);
        scratch.rope.clear();
        for &(_, position) in &scratch.tokens {
            let mut theta = position as f32;
            for _ in 0..h.head_dim / 2 {
                scratch.rope.push(theta.cos());
                scratch.rope.push(theta.sin());
                theta *= theta_scale;
            }
        }
        Ok(())
    }
}

/// Rotates each head of `x` by the angles in `rope`, pairs of adjacent values
/// (llama.cpp's "normal" rotary mode, which GGUF llama weights are laid out for).
pub(super) fn rotate(x: &mut [f32], rope: &[f32], head_dim: usize) {
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, angle) in head.chunks_exact_mut(2).zip(rope.chunks_exact(2)) {
            let (cos, sin) = (angle[0], angle[1]);
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0 * cos - x1 * sin;
            pair[1] = x0 * sin + x1 * cos;
        }
    }
}

pub(super) fn add(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// RMS-normalises each row of `x` with `weight` and quantizes the result.
pub(super) fn norm_and_quantize(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    width: usize,
    normed: &mut [f32],
    acts: &mut Quantized,
) {
    acts.clear();
    for (x, out) in x.chunks_exact(width).zip(normed.chunks_exact_mut(width)) {
        math::rms_norm(x, weight, eps, out);
        acts.push(out);
    }
}

/// Rotates each token's queries and keys, stores its keys and values in its
/// slot's cache, then runs each token's attention over its slot's cache, one
/// (token, key-value head) per task: the query heads sharing a key-value
/// head read its cache once.
pub(super) fn store_and_attend<T: CacheValue>(
    pool: &mut Pool,
    model: &GgufLlama,
    layer: usize,
    slots: &mut [SlotCache<T>],
    scratch: &mut Scratch,
) {
    let h = &model.hyper;
    let (d, qd, kvd) = (h.head_dim, h.q_dim(), h.kv_dim());
    let qkv_width = qd + 2 * kvd;
    for (t, row) in scratch.qkv.chunks_exact_mut(qkv_width).enumerate() {
        let rope = &scratch.rope[t * d..(t + 1) * d];
        let (q, kv) = row.split_at_mut(qd);
        rotate(&mut q[..], rope, d);
        rotate(&mut kv[..kvd], rope, d);
        let (slot, position) = scratch.tokens[t];
        let cache = &mut slots[slot];
        let (keys, values) = (&mut cache.keys[layer], &mut cache.values[layer]);
        keys.truncate(position * kvd);
        values.truncate(position * kvd);
        keys.extend(kv[..kvd].iter().map(|&v| T::from_f32(v)));
        values.extend(kv[kvd..].iter().map(|&v| T::from_f32(v)));
    }

    let group = h.heads / h.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let (tokens, qkv, kernels) = (&scratch.tokens, &scratch.qkv, &model.kernels);
    let kv_heads = h.kv_heads;
    let slots = &*slots;
    pool.for_each_chunk_mut(&mut scratch.attention, group * d, |i, out| {
        let (t, kv_head) = (i / kv_heads, i % kv_heads);
        let (slot, position) = tokens[t];
        let queries = &qkv[t * qkv_width + kv_head * group * d..][..group * d];
        let cache = HeadCache {
            keys: &slots[slot].keys[layer],
            values: &slots[slot].values[layer],
            stride: kvd,
            offset: kv_head * d,
            positions: position + 1,
        };
        SCORES.with(|scores| {
            kernels.attend(queries, cache, d, scale, &mut scores.borrow_mut(), out);
        });
    });
}

/// `out[t][..] = mats · acts[t]` for the `tokens` activation rows of width
/// `cols`, the matrices' outputs side by side in each row of `out`.
///
/// Many tokens (a prompt): the tokens are split among the threads, and each
/// multiplies every group of four weight rows, held in L1, with its tokens.
/// Few (generation): the groups are split, and each thread streams its
/// share of the weights once, into a transposed buffer.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    pool: &mut Pool,
    kernels: &Kernels,
    mats: &[&Matrix],
    acts: &Quantized,
    cols: usize,
    tokens: usize,
    out: &mut [f32],
    transposed: &mut Vec<f32>,
) {
    let width: usize = mats.iter().map(|m| m.rows).sum();
    debug_assert_eq!(out.len(), tokens * width);
    if tokens == 0 {
        return;
    }
    if tokens >= 8 {
        // A few tiles per thread, so one the OS delays does not hold the others up.
        let tile = (tokens / (pool.threads() * 4)).clamp(4, 16);
        pool.for_each_chunk_mut(out, tile * width, |i, out| {
            let first = i * tile;
            let count = out.len() / width;
            let mut column = 0;
            for m in mats {
                for g in 0..m.groups() {
                    let group = m.group(g);
                    for t in 0..count {
                        let dots = kernels.rows4(m.kind, group, acts.row(first + t, cols));
                        let at = t * width + column + g * GROUP;
                        out[at..at + GROUP].copy_from_slice(&dots);
                    }
                }
                column += m.rows;
            }
        });
        return;
    }

    let groups = width / GROUP;
    let tile = (groups / (pool.threads() * 8)).clamp(4, 64);
    let direct = tokens == 1;
    let target: &mut [f32] = if direct {
        &mut *out
    } else {
        transposed.resize(width * tokens, 0.0);
        &mut transposed[..]
    };
    pool.for_each_chunk_mut(target, tile * GROUP * tokens, |i, out| {
        for (offset, out) in out.chunks_exact_mut(GROUP * tokens).enumerate() {
            // The matrix of global group i·tile + offset.
            let mut g = i * tile + offset;
            let mut m = 0;
            while g >= mats[m].groups() {
                g -= mats[m].groups();
                m += 1;
            }
            let matrix = mats[m];
            let group = matrix.group(g);
            for t in 0..tokens {
                let dots = kernels.rows4(matrix.kind, group, acts.row(t, cols));
                for (j, dot) in dots.into_iter().enumerate() {
                    out[j * tokens + t] = dot;
                }
            }
        }
    });
    if !direct {
        for (t, row) in out.chunks_exact_mut(width).enumerate() {
            for (c, value) in row.iter_mut().enumerate() {
                *value = transposed[c * tokens + t];
            }
        }
    }
}
