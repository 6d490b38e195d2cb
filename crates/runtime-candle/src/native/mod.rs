//! Our own forward pass for llama-architecture GGUF models whose matrices are
//! Q4_1 or Q8_0 (the demo model and many small ones): the file's blocks are
//! multiplied as they are, by the [`kernels`](crate::kernels), with no
//! re-quantization. Other GGUF models go to candle's quantized llama.
//!
//! It runs several sequences at once: one call of [`Runner::forward`] takes
//! a batch of steps (a prompt chunk of one sequence, the next token of
//! others), so every weight is read once per batch, not once per sequence.
//! Each sequence has a slot: a KV cache that grows with it, up to the model's
//! trained context.
//!
//! The order of operations follows llama.cpp's CPU backend (8-bit activations
//! per block, RMS norm and softmax sums in `f64`, rotary angles by repeated
//! multiplication), so greedy tokens match its own up to near ties.

mod cache;
mod forward;
mod gguf;
pub(crate) mod pool;

pub(crate) use forward::Forward;
pub(crate) use gguf::{GgufLlama, Unsupported};

/// Prompt tokens one forward pass takes at most (llama.cpp's default micro-batch).
pub(crate) const MAX_BATCH: usize = 512;

/// One sequence's part of a batch: `tokens` at `position..`, in `slot`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step<'a> {
    pub(crate) slot: usize,
    pub(crate) position: usize,
    pub(crate) tokens: &'a [u32],
    /// Whether the logits after the last token are wanted (not for a
    /// prompt chunk that more of the prompt follows).
    pub(crate) logits: bool,
}

#[cfg(test)]
mod tests;
