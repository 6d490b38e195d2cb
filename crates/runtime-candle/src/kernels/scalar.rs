//! The reference dot products, in plain Rust: the definition the SIMD
//! kernels are tested against, bit for bit.
//!
//! They add in the order a 256-bit register does: each block's 32 integer
//! products fall into eight lanes of four consecutive values; each lane
//! accumulates `scale × lane` over the blocks with a fused multiply-add; the
//! eight lanes are summed pairwise at the end ([`reduce`]); Q4_1's offsets
//! `m·s` are summed block after block and added last. Integer sums are
//! exact, so the same order of float operations gives the same bits.

use super::{
    BLOCK, BlockType, CacheValue, GROUP, HeadCache, Q8_0_BYTES, QuantizedRow, checked_blocks,
    f16_at, unpacked_block,
};

/// Lanes of a 256-bit register of `f32`.
const LANES: usize = 8;

/// The eight lanes summed as the SIMD horizontal sum does:
/// `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))`.
fn reduce(lanes: [f32; LANES]) -> f32 {
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

/// One weight row (plain GGUF blocks) against quantized activations.
#[cfg(test)]
pub(super) fn dot(kind: BlockType, row: &[u8], x: QuantizedRow<'_>) -> f32 {
    let bb = kind.block_bytes();
    assert!(
        row.len() == x.blocks() * bb,
        "a weight row and its activations disagree in length"
    );
    dot_blocks(kind, x, |b, out| {
        out.copy_from_slice(&row[b * bb..(b + 1) * bb])
    })
}

/// The four rows of a packed group against quantized activations.
pub(super) fn rows4(kind: BlockType, group: &[u8], x: QuantizedRow<'_>) -> [f32; GROUP] {
    checked_blocks(kind, group, &x);
    std::array::from_fn(|r| dot_blocks(kind, x, |b, out| unpacked_block(kind, group, r, b, out)))
}

/// The definition, over the weight blocks `fill(b, block)` writes for each
/// block `b` of `x`.
fn dot_blocks(kind: BlockType, x: QuantizedRow<'_>, fill: impl Fn(usize, &mut [u8])) -> f32 {
    let mut acc = [0f32; LANES];
    let mut offsets = 0f32;
    let mut weights = [0i32; BLOCK];
    let mut buffer = [0u8; Q8_0_BYTES];
    let block = &mut buffer[..kind.block_bytes()];
    for b in 0..x.blocks() {
        fill(b, block);
        let scale = match kind {
            BlockType::Q4_1 => {
                let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                offsets += m * x.s[b];
                for (i, byte) in block[4..].iter().enumerate() {
                    weights[i] = i32::from(byte & 0x0f);
                    weights[i + 16] = i32::from(byte >> 4);
                }
                d * x.d[b]
            }
            BlockType::Q8_0 => {
                for (w, &q) in weights.iter_mut().zip(&block[2..]) {
                    *w = i32::from(q as i8);
                }
                f16_at(block, 0) * x.d[b]
            }
        };
        let activations = &x.qs[b * BLOCK..(b + 1) * BLOCK];
        for (lane, sum) in acc.iter_mut().enumerate() {
            let products: i32 = (4 * lane..4 * lane + 4)
                .map(|i| weights[i] * i32::from(activations[i]))
                .sum();
            *sum = scale.mul_add(products as f32, *sum);
        }
    }
    match kind {
        BlockType::Q4_1 => reduce(acc) + offsets,
        BlockType::Q8_0 => reduce(acc),
    }
}

/// Attention in plain Rust: scores, softmax, weighted sum, one query head
/// after another, the cache widened to f32 as it is read.
pub(super) fn attend<T: CacheValue>(
    queries: &[f32],
    cache: HeadCache<'_, T>,
    dim: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    use super::math;
    let mut row = vec![0f32; dim];
    for (q, out) in queries.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        scores.clear();
        for p in 0..cache.positions {
            widen(cache.key(p, dim), &mut row);
            scores.push(math::dot(q, &row) * scale);
        }
        math::softmax(scores);
        out.fill(0.0);
        for (p, &weight) in scores.iter().enumerate() {
            widen(cache.value(p, dim), &mut row);
            math::axpy(out, weight, &row);
        }
    }
}

fn widen<T: CacheValue>(values: &[T], out: &mut [f32]) {
    for (out, v) in out.iter_mut().zip(values) {
        *out = v.to_f32();
    }
}
