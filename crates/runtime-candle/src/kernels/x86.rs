//! The dot products on x86-64 with AVX2, FMA and F16C, on packed groups of
//! four rows: per block, the four rows' scales convert in one instruction,
//! then each row's 32 products form eight `i32` lanes of four products,
//! scaled into eight `f32` lanes with a fused multiply-add. Where the CPU
//! has AVX-VNNI, one `vpdpbusd` forms a lane's products and sum; the
//! integers, and so every bit of the result, are the same.
//!
//! `unsafe` here: the functions carrying `#[target_feature]` may only be
//! called where the CPU has those features, which [`kernels`] checks at run
//! time, and the loads take raw pointers, each into a slice of the length
//! read, whose bounds are checked.
#![allow(unsafe_code)]

// The intrinsics, by their Intel names.
use std::arch::x86_64::*;

use super::{
    BLOCK, BlockType, GROUP, HeadCache, Kernels, Q4_1_BYTES, Q8_0_BYTES, QuantizedRow,
    checked_blocks, scalar,
};

/// The best kernels this CPU runs, if it has AVX2, FMA and F16C.
pub(super) fn kernels() -> Option<Kernels> {
    let base = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    if !base {
        return None;
    }
    if is_x86_feature_detected!("avxvnni") {
        return Some(vnni::KERNELS);
    }
    Some(avx2::KERNELS)
}

/// The sum of the eight lanes: `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))`,
/// as the scalar reference defines it.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let sum = _mm_add_ps(lo, hi);
    let shuf = _mm_movehdup_ps(sum);
    let sums = _mm_add_ps(sum, shuf);
    let high = _mm_movehl_ps(shuf, sums);
    _mm_cvtss_f32(_mm_add_ps(sums, high))
}

/// Lane `r` of `v` in all eight lanes (`r` is a constant once unrolled).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lane(v: __m128, r: usize) -> __m256 {
    _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_set1_epi32(r as i32))
}

/// The 32 four-bit weights of a Q4_1 block as 32 bytes, in value order: the
/// low nibbles (values 0..16), then the high ones (16..32).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn unpack_q4(nibbles: &[u8; 16]) -> __m256i {
    // SAFETY: `nibbles` holds the 16 bytes read.
    let raw = unsafe { _mm_loadu_si128(nibbles.as_ptr().cast()) };
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// 32 bytes as a vector.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn load32<T>(values: &[T; 32]) -> __m256i {
    // SAFETY: `values` holds the 32 bytes read (`T` is a byte type).
    const { assert!(size_of::<T>() == 1) };
    unsafe { _mm256_loadu_si256(values.as_ptr().cast()) }
}

/// Block `b` of the activations.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn activations(x: &QuantizedRow<'_>, b: usize) -> __m256i {
    load32(
        x.qs[b * BLOCK..(b + 1) * BLOCK]
            .try_into()
            .expect("a whole block"),
    )
}

/// Σ(unsigned × signed) over each lane's four byte pairs, as `f32`, with
/// AVX2: pairs into `i16` (no saturation: the operands are at most 15 × 127
/// or 127 × 127), then pairs of those into `i32`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn products_avx2(unsigned: __m256i, signed: __m256i) -> __m256 {
    let pairs = _mm256_maddubs_epi16(unsigned, signed);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

/// The same sums with one AVX-VNNI instruction.
#[inline]
#[target_feature(enable = "avx2,fma,avxvnni")]
fn products_vnni(unsigned: __m256i, signed: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(
        _mm256_setzero_si256(),
        unsigned,
        signed,
    ))
}

/// Q8_0 × Q8_0 as unsigned × signed, which both product instructions want:
/// `|w| × (a with w's sign)`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn signed_pair(weights: __m256i, activations: __m256i) -> (__m256i, __m256i) {
    (
        _mm256_sign_epi8(weights, weights),
        _mm256_sign_epi8(activations, weights),
    )
}

/// Eight f16 of `values` (which must hold at least eight), widened.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load8_f16(values: &[half::f16]) -> __m256 {
    let values: &[half::f16; 8] = values[..8].try_into().expect("eight halves");
    // SAFETY: `values` holds the 16 bytes read.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(values.as_ptr().cast()) })
}

/// Eight floats of `values` (which must hold at least eight).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn load8(values: &[f32]) -> __m256 {
    let values: &[f32; 8] = values[..8].try_into().expect("eight floats");
    // SAFETY: `values` holds the eight floats read.
    unsafe { _mm256_loadu_ps(values.as_ptr()) }
}

/// Stores eight floats into `out` (which must hold at least eight).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn store8(out: &mut [f32], v: __m256) {
    let out: &mut [f32; 8] = (&mut out[..8]).try_into().expect("eight floats");
    // SAFETY: `out` holds the eight floats written.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
}

/// `e^x` lane by lane, the same polynomial as `math::exp`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.3),
    );
    let round = _mm256_set1_ps(12_582_912.0);
    let n = _mm256_sub_ps(
        _mm256_add_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            round,
        ),
        round,
    );
    let r = _mm256_sub_ps(
        _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693_359_4))),
        _mm256_mul_ps(n, _mm256_set1_ps(-2.121_944_4e-4)),
    );
    let r2 = _mm256_mul_ps(r, r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
    }
    let e_r = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, r2), r), _mm256_set1_ps(1.0));
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(e_r, _mm256_castsi256_ps(bits))
}

/// Softmax in place: `e^(x - max) / Σ`.
#[target_feature(enable = "avx2,fma")]
fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let shift = _mm256_set1_ps(max);
    let mut sums = _mm256_setzero_ps();
    let mut chunks = x.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let e = exp8(_mm256_sub_ps(load8(chunk), shift));
        sums = _mm256_add_ps(sums, e);
        store8(chunk, e);
    }
    let mut tail = 0f64;
    for v in chunks.into_remainder() {
        *v = super::math::exp(*v - max);
        tail += f64::from(*v);
    }
    let mut lanes = [0f32; 8];
    store8(&mut lanes, sums);
    let sum = lanes.iter().map(|&v| f64::from(v)).sum::<f64>() + tail;
    let inverse = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inverse);
}

/// Stamps out attention over a cache of `$value`s, read with `$load`: each
/// key row is read once for all the query heads that share it, and each
/// head's weighted sum of values stays in registers, 64 values at a time.
macro_rules! attention {
    ($attend:ident, $simd:ident, $value:ty, $load:ident) => {
        fn $attend(
            queries: &[f32],
            cache: HeadCache<'_, $value>,
            dim: usize,
            scale: f32,
            scores: &mut Vec<f32>,
            out: &mut [f32],
        ) {
            if !dim.is_multiple_of(8) {
                return scalar::attend(queries, cache, dim, scale, scores, out);
            }
            // SAFETY: only the kernel sets that checked for AVX2, FMA and
            // F16C hand this out; `Kernels::attend` checked the cache's bounds.
            unsafe { $simd(queries, cache, dim, scale, scores, out) }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        fn $simd(
            queries: &[f32],
            cache: HeadCache<'_, $value>,
            dim: usize,
            scale: f32,
            scores: &mut Vec<f32>,
            out: &mut [f32],
        ) {
            let heads = queries.len() / dim;
            let n = cache.positions;
            scores.clear();
            scores.resize(heads * n, 0.0);
            for p in 0..n {
                let k = cache.key(p, dim);
                for (h, q) in queries.chunks_exact(dim).enumerate() {
                    let mut acc = _mm256_setzero_ps();
                    for c in (0..dim).step_by(8) {
                        acc = _mm256_fmadd_ps(load8(&q[c..]), $load(&k[c..]), acc);
                    }
                    scores[h * n + p] = hsum(acc) * scale;
                }
            }
            for (weights, out) in scores.chunks_exact_mut(n).zip(out.chunks_exact_mut(dim)) {
                softmax(weights);
                for start in (0..dim).step_by(64) {
                    let out = &mut out[start..dim.min(start + 64)];
                    if out.len() == 64 {
                        // Eight accumulators, unrolled, kept in registers.
                        let mut acc = [_mm256_setzero_ps(); 8];
                        for (p, &w) in weights.iter().enumerate() {
                            let v = &cache.value(p, dim)[start..start + 64];
                            let w = _mm256_set1_ps(w);
                            for (r, acc) in acc.iter_mut().enumerate() {
                                *acc = _mm256_fmadd_ps(w, $load(&v[8 * r..]), *acc);
                            }
                        }
                        for (r, acc) in acc.into_iter().enumerate() {
                            store8(&mut out[8 * r..], acc);
                        }
                    } else {
                        out.fill(0.0);
                        for (p, &w) in weights.iter().enumerate() {
                            let v = &cache.value(p, dim)[start..start + out.len()];
                            for (out, v) in out.chunks_exact_mut(8).zip(v.chunks_exact(8)) {
                                let sum = _mm256_fmadd_ps(_mm256_set1_ps(w), $load(v), load8(out));
                                store8(out, sum);
                            }
                        }
                    }
                }
            }
        }
    };
}

attention!(attend_f16, attend_simd_f16, half::f16, load8_f16);
attention!(attend_f32, attend_simd_f32, f32, load8);

/// Stamps out the kernels for one set of target features and one way of
/// forming the products.
macro_rules! kernel_set {
    ($module:ident, $name:literal, $features:literal, $products:ident) => {
        mod $module {
            use super::*;

            pub(in super::super) const KERNELS: Kernels = Kernels {
                q4_1,
                q8_0,
                attend_f16: super::attend_f16,
                attend_f32: super::attend_f32,
                name: $name,
            };

            fn q4_1(group: &[u8], x: QuantizedRow<'_>) -> [f32; GROUP] {
                let blocks = checked_blocks(BlockType::Q4_1, group, &x);
                // SAFETY: `KERNELS` is only handed out where the CPU has these features.
                unsafe { q4_1_simd(group, x, blocks) }
            }

            fn q8_0(group: &[u8], x: QuantizedRow<'_>) -> [f32; GROUP] {
                let blocks = checked_blocks(BlockType::Q8_0, group, &x);
                // SAFETY: as in `q4_1`.
                unsafe { q8_0_simd(group, x, blocks) }
            }

            #[target_feature(enable = $features)]
            fn q4_1_simd(group: &[u8], x: QuantizedRow<'_>, blocks: usize) -> [f32; GROUP] {
                const STRIDE: usize = GROUP * Q4_1_BYTES;
                let mut acc = [_mm256_setzero_ps(); GROUP];
                let mut offsets = _mm_setzero_ps();
                for b in 0..blocks {
                    let block: &[u8; STRIDE] = group[b * STRIDE..(b + 1) * STRIDE]
                        .try_into()
                        .expect("a whole block");
                    // SAFETY: the block's first 16 bytes: four `d`, four `m`.
                    let dm = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(block.as_ptr().cast()) });
                    let (d, m) = (_mm256_castps256_ps128(dm), _mm256_extractf128_ps::<1>(dm));
                    let scales = _mm_mul_ps(d, _mm_set1_ps(x.d[b]));
                    offsets = _mm_add_ps(offsets, _mm_mul_ps(m, _mm_set1_ps(x.s[b])));
                    let a = activations(&x, b);
                    let row = |r: usize| -> &[u8; 16] {
                        block[16 + 16 * r..32 + 16 * r]
                            .try_into()
                            .expect("16 bytes")
                    };
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let products = $products(unpack_q4(row(r)), a);
                        *acc = _mm256_fmadd_ps(lane(scales, r), products, *acc);
                    }
                }
                let mut offset = [0f32; GROUP];
                // SAFETY: `offset` holds the four floats stored.
                unsafe { _mm_storeu_ps(offset.as_mut_ptr(), offsets) };
                std::array::from_fn(|r| hsum(acc[r]) + offset[r])
            }

            #[target_feature(enable = $features)]
            fn q8_0_simd(group: &[u8], x: QuantizedRow<'_>, blocks: usize) -> [f32; GROUP] {
                const STRIDE: usize = GROUP * Q8_0_BYTES;
                let mut acc = [_mm256_setzero_ps(); GROUP];
                for b in 0..blocks {
                    let block: &[u8; STRIDE] = group[b * STRIDE..(b + 1) * STRIDE]
                        .try_into()
                        .expect("a whole block");
                    // SAFETY: the block's first 8 bytes: four `d`.
                    let d = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(block.as_ptr().cast()) });
                    let scales = _mm_mul_ps(d, _mm_set1_ps(x.d[b]));
                    let a = activations(&x, b);
                    let row = |r: usize| -> &[u8; 32] {
                        block[8 + 32 * r..40 + 32 * r].try_into().expect("32 bytes")
                    };
                    let product = |r: usize| {
                        let (unsigned, signed) = signed_pair(load32(row(r)), a);
                        $products(unsigned, signed)
                    };
                    for (r, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(lane(scales, r), product(r), *acc);
                    }
                }
                std::array::from_fn(|r| hsum(acc[r]))
            }
        }
    };
}

kernel_set!(avx2, "avx2", "avx2,fma,f16c", products_avx2);
kernel_set!(vnni, "avx-vnni", "avx2,fma,f16c,avxvnni", products_vnni);
