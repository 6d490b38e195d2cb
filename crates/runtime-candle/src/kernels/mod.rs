//! Quantized matrix-vector kernels for GGUF weights.
//!
//! GGUF stores weights in blocks of 32 values. Before a matrix product, the
//! activations are quantized to 8 bits per block too (as llama.cpp does),
//! so each block's dot product is an integer sum that SIMD computes 32
//! products at a time, scaled once by the two blocks' factors:
//!
//! - Q4_1 weights (`d`, `m`, 32 four-bit `q` in 0..16: `x = d·q + m`) against
//!   Q8_1 activations (`d`, `s = d·Σq`, 32 `i8`): `d_w·d_a·Σ(q_w·q_a) + m_w·s_a`;
//! - Q8_0 weights (`d`, 32 `i8`) against Q8_0 activations: `d_w·d_a·Σ(q_w·q_a)`.
//!
//! Weights are [`pack`]ed on load, losslessly: four rows' blocks interleaved,
//! their scales side by side. A product then reads one sequential stream
//! (four rows read block by block are four streams, which the hardware
//! prefetchers follow poorly) and converts eight scales in one instruction.
//!
//! [`scalar`] is the reference, on plain GGUF rows; [`x86`] computes the same
//! on packed rows with AVX2 and FMA, chosen at run time ([`Kernels::detect`]).
//! Both add in the same order, so they agree bit for bit, and a machine
//! without AVX2 computes the same tokens. [`math`] holds the scalar
//! functions both use, and the forward pass too (norms, softmax, `exp`).

pub(crate) mod math;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use half::f16;

/// Values per block, for every type here.
pub(crate) const BLOCK: usize = 32;
/// Rows per packed group.
pub(crate) const GROUP: usize = 4;

/// Bytes of one Q4_1 block: `d`, `m` (f16 each) and 16 bytes of nibbles.
pub(crate) const Q4_1_BYTES: usize = 20;
/// Bytes of one Q8_0 block: `d` (f16) and 32 `i8`.
pub(crate) const Q8_0_BYTES: usize = 34;

/// Activations quantized to 8 bits per value, in blocks of 32: what a
/// weight row is multiplied with.
#[derive(Debug, Clone, Default)]
pub(crate) struct Quantized {
    /// The values, block after block.
    pub(crate) qs: Vec<i8>,
    /// Each block's scale (an f16, widened, as llama.cpp stores it).
    pub(crate) d: Vec<f32>,
    /// Each block's `d·Σq` (an f16, widened), for Q4_1's offset.
    pub(crate) s: Vec<f32>,
}

impl Quantized {
    /// Forgets the rows held, keeping the memory.
    pub(crate) fn clear(&mut self) {
        self.qs.clear();
        self.d.clear();
        self.s.clear();
    }

    /// Quantizes `x` (a multiple of 32 values) and appends it, as llama.cpp's
    /// AVX2 code does: `d = amax / 127` and `q = round(x · 127 / amax)`,
    /// ties to even; `d` and `s = d·Σq` kept at f16 precision.
    pub(crate) fn push(&mut self, x: &[f32]) {
        debug_assert_eq!(x.len() % BLOCK, 0);
        /// Rounds to the nearest integer, ties to even, with two additions.
        const ROUND: f32 = 12_582_912.0;
        for block in x.chunks_exact(BLOCK) {
            let mut lanes = [0f32; 8];
            for chunk in block.chunks_exact(8) {
                for (lane, v) in lanes.iter_mut().zip(chunk) {
                    *lane = lane.max(v.abs());
                }
            }
            let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut q = [0i8; BLOCK];
            for (q, &v) in q.iter_mut().zip(block) {
                *q = ((v * id + ROUND) - ROUND) as i8;
            }
            let sum: i32 = q.iter().map(|&q| i32::from(q)).sum();
            self.qs.extend_from_slice(&q);
            self.d.push(f16::from_f32(d).to_f32());
            self.s.push(f16::from_f32(d * sum as f32).to_f32());
        }
    }

    /// The `index`-th row of `len` values, when rows of that length are held.
    pub(crate) fn row(&self, index: usize, len: usize) -> QuantizedRow<'_> {
        let blocks = len / BLOCK;
        QuantizedRow {
            qs: &self.qs[index * len..(index + 1) * len],
            d: &self.d[index * blocks..(index + 1) * blocks],
            s: &self.s[index * blocks..(index + 1) * blocks],
        }
    }
}

/// One row of [`Quantized`] activations.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuantizedRow<'a> {
    pub(crate) qs: &'a [i8],
    pub(crate) d: &'a [f32],
    pub(crate) s: &'a [f32],
}

impl QuantizedRow<'_> {
    /// Blocks held.
    pub(crate) fn blocks(&self) -> usize {
        self.d.len()
    }
}

/// The GGUF block types the kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockType {
    Q4_1,
    Q8_0,
}

impl BlockType {
    /// Bytes per block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => Q4_1_BYTES,
            Self::Q8_0 => Q8_0_BYTES,
        }
    }

    /// Bytes of a block's scales (`d`, and `m` for Q4_1), which packing
    /// moves to the front of a group.
    fn scale_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 4,
            Self::Q8_0 => 2,
        }
    }
}

/// Four rows' products with one activation row, from a packed group.
type Rows4 = fn(&[u8], QuantizedRow<'_>) -> [f32; GROUP];

/// A value of the KV cache: `f16`, half the memory to read per generated
/// token (decoding past a few hundred positions waits on that), as llama.cpp
/// keeps it by default; or `f32`, exact.
pub(crate) trait CacheValue:
    Copy + Default + Send + Sync + std::fmt::Debug + 'static
{
    fn from_f32(value: f32) -> Self;
    fn to_f32(self) -> f32;
    /// The attention kernel for a cache of this type.
    fn attention(kernels: &Kernels) -> Attend<Self>;
}

impl CacheValue for f16 {
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }

    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    fn attention(kernels: &Kernels) -> Attend<Self> {
        kernels.attend_f16
    }
}

impl CacheValue for f32 {
    fn from_f32(value: f32) -> Self {
        value
    }

    fn to_f32(self) -> f32 {
        self
    }

    fn attention(kernels: &Kernels) -> Attend<Self> {
        kernels.attend_f32
    }
}

/// The keys and values of one key-value head at positions `0..positions`
/// of a cache whose rows hold every head.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadCache<'a, T> {
    pub(crate) keys: &'a [T],
    pub(crate) values: &'a [T],
    /// Values from one position's row to the next.
    pub(crate) stride: usize,
    /// Where this head's values start in a row.
    pub(crate) offset: usize,
    pub(crate) positions: usize,
}

impl<'a, T> HeadCache<'a, T> {
    /// The key at position `p`.
    #[inline]
    pub(crate) fn key(&self, p: usize, dim: usize) -> &'a [T] {
        &self.keys[p * self.stride + self.offset..][..dim]
    }

    /// The value at position `p`.
    #[inline]
    pub(crate) fn value(&self, p: usize, dim: usize) -> &'a [T] {
        &self.values[p * self.stride + self.offset..][..dim]
    }

    /// Checks that every position's `dim` values lie in the slices (the SIMD
    /// kernel relies on it).
    fn check(&self, dim: usize) {
        let end = (self.positions.max(1) - 1) * self.stride + self.offset + dim;
        assert!(
            self.positions > 0 && self.keys.len() >= end && self.values.len() >= end,
            "the attention reads past its cache"
        );
    }
}

/// Attention of a group of query heads (`dim` values each, side by side)
/// over one key-value head: `out = softmax(q·K·scale)·V` per query head.
/// `scores` is scratch space.
pub(crate) type Attend<T> = fn(&[f32], HeadCache<'_, T>, usize, f32, &mut Vec<f32>, &mut [f32]);

/// The dot products this machine runs best.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernels {
    q4_1: Rows4,
    q8_0: Rows4,
    attend_f16: Attend<f16>,
    attend_f32: Attend<f32>,
    /// Which implementation, for logs and reports.
    pub(crate) name: &'static str,
}

impl Kernels {
    /// The best this CPU has: AVX2 and FMA (with AVX-VNNI where present) on
    /// x86-64, else the scalar reference.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(kernels) = x86::kernels() {
            return kernels;
        }
        Self::scalar()
    }

    /// The scalar reference.
    pub(crate) fn scalar() -> Self {
        Self {
            q4_1: |group, x| scalar::rows4(BlockType::Q4_1, group, x),
            q8_0: |group, x| scalar::rows4(BlockType::Q8_0, group, x),
            attend_f16: scalar::attend,
            attend_f32: scalar::attend,
            name: "scalar",
        }
    }

    /// Attention of the query heads in `queries` over `cache` (see [`HeadCache`]).
    #[inline]
    pub(crate) fn attend<T: CacheValue>(
        &self,
        queries: &[f32],
        cache: HeadCache<'_, T>,
        dim: usize,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        assert!(
            dim > 0 && queries.len().is_multiple_of(dim) && out.len() == queries.len(),
            "the queries and outputs of attention disagree"
        );
        cache.check(dim);
        (T::attention(self))(queries, cache, dim, scale, scores, out);
    }

    /// The products of the four rows of a packed `group` of `kind` with `x`.
    #[inline]
    pub(crate) fn rows4(&self, kind: BlockType, group: &[u8], x: QuantizedRow<'_>) -> [f32; GROUP] {
        match kind {
            BlockType::Q4_1 => (self.q4_1)(group, x),
            BlockType::Q8_0 => (self.q8_0)(group, x),
        }
    }
}

/// The number of blocks per row in a packed `group`, after checking that `x`
/// holds as many (the SIMD kernels rely on it; a mismatch is a caller's bug).
pub(crate) fn checked_blocks(kind: BlockType, group: &[u8], x: &QuantizedRow<'_>) -> usize {
    let group_block = GROUP * kind.block_bytes();
    let blocks = group.len() / group_block;
    assert!(
        group.len() == blocks * group_block
            && x.qs.len() == blocks * BLOCK
            && x.d.len() == blocks
            && x.s.len() == blocks,
        "a weight row and its activations disagree in length"
    );
    blocks
}

/// Rearranges `rows` (a multiple of four rows of `row_bytes` each, as GGUF
/// stores them) into groups of four: for each block, the four rows' scales
/// (Q4_1: four `d`, then four `m`; Q8_0: four `d`), then their values, row
/// after row. Only the order of the bytes changes.
pub(crate) fn pack(kind: BlockType, rows: &[u8], row_bytes: usize) -> Vec<u8> {
    let (bb, sb) = (kind.block_bytes(), kind.scale_bytes());
    let blocks = row_bytes / bb;
    let mut packed = Vec::with_capacity(rows.len());
    for group in rows.chunks_exact(GROUP * row_bytes) {
        for b in 0..blocks {
            let block = |r: usize| &group[r * row_bytes + b * bb..r * row_bytes + (b + 1) * bb];
            // Each scale field in turn (d, then m), for the four rows.
            for field in (0..sb).step_by(2) {
                for r in 0..GROUP {
                    packed.extend_from_slice(&block(r)[field..field + 2]);
                }
            }
            for r in 0..GROUP {
                packed.extend_from_slice(&block(r)[sb..]);
            }
        }
    }
    packed
}

/// Block `b` of row `r` of a packed group, as GGUF stores it (`out` must
/// hold one block).
pub(crate) fn unpacked_block(kind: BlockType, group: &[u8], r: usize, b: usize, out: &mut [u8]) {
    let (bb, sb) = (kind.block_bytes(), kind.scale_bytes());
    let block = &group[b * GROUP * bb..(b + 1) * GROUP * bb];
    for field in (0..sb).step_by(2) {
        let at = field * GROUP + 2 * r;
        out[field..field + 2].copy_from_slice(&block[at..at + 2]);
    }
    let values = bb - sb;
    let at = sb * GROUP + r * values;
    out[sb..bb].copy_from_slice(&block[at..at + values]);
}

/// A block's f16 field at `offset`, widened.
#[inline(always)]
pub(crate) fn f16_at(bytes: &[u8], offset: usize) -> f32 {
    f16::from_le_bytes([bytes[offset], bytes[offset + 1]]).to_f32()
}

/// The 32 values of one GGUF block, dequantized into `out`.
pub(crate) fn dequantize_block(kind: BlockType, block: &[u8], out: &mut [f32]) {
    match kind {
        BlockType::Q4_1 => {
            let (d, m) = (f16_at(block, 0), f16_at(block, 2));
            for (i, byte) in block[4..Q4_1_BYTES].iter().enumerate() {
                out[i] = d * f32::from(byte & 0x0f) + m;
                out[i + 16] = d * f32::from(byte >> 4) + m;
            }
        }
        BlockType::Q8_0 => {
            let d = f16_at(block, 0);
            for (value, &q) in out.iter_mut().zip(&block[2..Q8_0_BYTES]) {
                *value = d * f32::from(q as i8);
            }
        }
    }
}

/// Row `r` of a packed group, dequantized into `out` (one row's values).
pub(crate) fn dequantize_row(kind: BlockType, group: &[u8], r: usize, out: &mut [f32]) {
    let mut block = [0u8; Q8_0_BYTES];
    let block = &mut block[..kind.block_bytes()];
    for (b, values) in out.chunks_exact_mut(BLOCK).enumerate() {
        unpacked_block(kind, group, r, b, block);
        dequantize_block(kind, block, values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes and floats, without a dependency.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }

        fn float(&mut self) -> f32 {
            (self.next() as f32 / u32::MAX as f32 - 0.25) * 4.0
        }
    }

    fn q4_1_row(rng: &mut Lcg, blocks: usize) -> Vec<u8> {
        let mut row = Vec::new();
        for _ in 0..blocks {
            row.extend(f16::from_f32(rng.float() * 0.1).to_le_bytes());
            row.extend(f16::from_f32(rng.float() * 0.5).to_le_bytes());
            row.extend((0..16).map(|_| rng.next() as u8));
        }
        row
    }

    fn q8_0_row(rng: &mut Lcg, blocks: usize) -> Vec<u8> {
        let mut row = Vec::new();
        for _ in 0..blocks {
            row.extend(f16::from_f32(rng.float() * 0.05).to_le_bytes());
            // -128 never occurs: ggml's quantizer rounds into -127..=127.
            row.extend(
                (0..32)
                    .map(|_| (rng.next() % 255) as u8 ^ 0x80)
                    .map(|b| if b == 0x80 { 0x81 } else { b }),
            );
        }
        row
    }

    fn rows_of(kind: BlockType, rng: &mut Lcg, rows: usize, blocks: usize) -> Vec<u8> {
        (0..rows)
            .flat_map(|_| match kind {
                BlockType::Q4_1 => q4_1_row(rng, blocks),
                BlockType::Q8_0 => q8_0_row(rng, blocks),
            })
            .collect()
    }

    fn activations(rng: &mut Lcg, len: usize) -> Quantized {
        let x: Vec<f32> = (0..len).map(|_| rng.float()).collect();
        let mut q = Quantized::default();
        q.push(&x);
        q
    }

    #[test]
    fn quantizing_keeps_each_value_within_half_a_step() {
        let mut rng = Lcg(7);
        let x: Vec<f32> = (0..96).map(|_| rng.float()).collect();
        let mut q = Quantized::default();
        q.push(&x);
        for (i, &v) in x.iter().enumerate() {
            let d = q.d[i / BLOCK];
            let back = f32::from(q.qs[i]) * d;
            assert!((back - v).abs() <= d * 0.5 + 1e-3, "{i}: {v} -> {back}");
        }
        let sum: i32 = q.qs[..32].iter().map(|&v| i32::from(v)).sum();
        assert!((q.s[0] - sum as f32 * q.d[0]).abs() <= q.s[0].abs() * 1e-3 + 1e-3);
    }

    #[test]
    fn packing_moves_bytes_without_changing_any_value() {
        let mut rng = Lcg(5);
        for kind in [BlockType::Q4_1, BlockType::Q8_0] {
            let (rows, blocks) = (8, 3);
            let row_bytes = blocks * kind.block_bytes();
            let plain = rows_of(kind, &mut rng, rows, blocks);
            let packed = pack(kind, &plain, row_bytes);
            assert_eq!(packed.len(), plain.len());
            let mut block = vec![0u8; kind.block_bytes()];
            for (g, group) in packed.chunks_exact(GROUP * row_bytes).enumerate() {
                for r in 0..GROUP {
                    for b in 0..blocks {
                        unpacked_block(kind, group, r, b, &mut block);
                        let start = (g * GROUP + r) * row_bytes + b * kind.block_bytes();
                        assert_eq!(block, &plain[start..start + kind.block_bytes()], "{kind:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_scalar_reference_equals_the_dequantized_sums() {
        let mut rng = Lcg(11);
        for kind in [BlockType::Q4_1, BlockType::Q8_0] {
            let row = rows_of(kind, &mut rng, 1, 18);
            let acts = activations(&mut rng, 18 * BLOCK);
            let mut w = vec![0f32; 18 * BLOCK];
            for (block, out) in row
                .chunks_exact(kind.block_bytes())
                .zip(w.chunks_exact_mut(BLOCK))
            {
                dequantize_block(kind, block, out);
            }
            let expected: f64 = w
                .iter()
                .zip(&acts.qs)
                .enumerate()
                .map(|(i, (w, &q))| f64::from(*w) * f64::from(q) * f64::from(acts.d[i / BLOCK]))
                .sum();
            let got = scalar::dot(kind, &row, acts.row(0, 18 * BLOCK));
            assert!(
                (f64::from(got) - expected).abs() < 1e-3 * expected.abs().max(1.0),
                "{kind:?}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn the_packed_kernels_equal_the_scalar_reference_bit_for_bit() {
        let mut rng = Lcg(13);
        for kernels in [Kernels::detect(), Kernels::scalar()] {
            for blocks in [1, 2, 3, 18, 48] {
                for kind in [BlockType::Q4_1, BlockType::Q8_0] {
                    for _ in 0..10 {
                        let row_bytes = blocks * kind.block_bytes();
                        let plain = rows_of(kind, &mut rng, GROUP, blocks);
                        let packed = pack(kind, &plain, row_bytes);
                        let acts = activations(&mut rng, blocks * BLOCK);
                        let x = acts.row(0, blocks * BLOCK);
                        let got = kernels.rows4(kind, &packed, x);
                        for (r, got) in got.into_iter().enumerate() {
                            let want =
                                scalar::dot(kind, &plain[r * row_bytes..(r + 1) * row_bytes], x);
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{} {kind:?} {blocks} blocks, row {r}: {got} vs {want}",
                                kernels.name
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dequantizing_a_packed_row_gives_the_plain_rows_values() {
        let mut rng = Lcg(3);
        for kind in [BlockType::Q4_1, BlockType::Q8_0] {
            let row_bytes = 2 * kind.block_bytes();
            let plain = rows_of(kind, &mut rng, GROUP, 2);
            let packed = pack(kind, &plain, row_bytes);
            let (mut from_packed, mut from_plain) = (vec![0f32; 64], vec![0f32; 64]);
            dequantize_row(kind, &packed, 2, &mut from_packed);
            for (block, out) in plain[2 * row_bytes..3 * row_bytes]
                .chunks_exact(kind.block_bytes())
                .zip(from_plain.chunks_exact_mut(BLOCK))
            {
                dequantize_block(kind, block, out);
            }
            assert_eq!(from_packed, from_plain);
        }
    }

    fn attention_agrees<T: CacheValue>() {
        let mut rng = Lcg(23);
        for (dim, group, positions) in [
            (64, 3, 1),
            (64, 3, 37),
            (64, 1, 300),
            (128, 2, 50),
            (32, 4, 9),
            (12, 2, 5),
        ] {
            let stride = 3 * dim;
            let offset = dim;
            let keys: Vec<T> = (0..positions * stride)
                .map(|_| T::from_f32(rng.float()))
                .collect();
            let values: Vec<T> = (0..positions * stride)
                .map(|_| T::from_f32(rng.float()))
                .collect();
            let queries: Vec<f32> = (0..group * dim).map(|_| rng.float()).collect();
            let cache = HeadCache {
                keys: &keys,
                values: &values,
                stride,
                offset,
                positions,
            };
            let (mut scores, mut a, mut b) =
                (Vec::new(), vec![0f32; group * dim], vec![0f32; group * dim]);
            Kernels::detect().attend(&queries, cache, dim, 0.125, &mut scores, &mut a);
            Kernels::scalar().attend(&queries, cache, dim, 0.125, &mut scores, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                    "{dim} {group} {positions}: {x} vs {y}"
                );
            }
            // Each output is a convex combination of the head's values.
            let (lo, hi) = values.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| {
                (l.min(v.to_f32()), h.max(v.to_f32()))
            });
            assert!(b.iter().all(|&v| v >= lo - 1e-4 && v <= hi + 1e-4));
        }
    }

    #[test]
    fn the_simd_attention_agrees_with_the_scalar_reference_on_both_cache_types() {
        attention_agrees::<f16>();
        attention_agrees::<f32>();
    }

    #[test]
    #[should_panic(expected = "past its cache")]
    fn attention_past_the_cache_is_refused() {
        let keys = vec![f16::ZERO; 64];
        let cache = HeadCache {
            keys: &keys,
            values: &keys,
            stride: 64,
            offset: 0,
            positions: 2,
        };
        Kernels::detect().attend(&[0.0; 64], cache, 64, 1.0, &mut Vec::new(), &mut [0.0; 64]);
    }

    #[test]
    #[should_panic(expected = "disagree in length")]
    fn a_weight_row_longer_than_its_activations_is_refused() {
        let mut rng = Lcg(19);
        let packed = pack(
            BlockType::Q4_1,
            &rows_of(BlockType::Q4_1, &mut rng, GROUP, 4),
            4 * Q4_1_BYTES,
        );
        let acts = activations(&mut rng, 2 * BLOCK);
        Kernels::detect().rows4(BlockType::Q4_1, &packed, acts.row(0, 2 * BLOCK));
    }
}
