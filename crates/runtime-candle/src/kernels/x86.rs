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

use std::arch::x86_64::{
    __m128, __m256, __m256i, _mm_add_ps, _mm_cvtph_ps, _mm_cvtss_f32, _mm_loadl_epi64,
    _mm_loadu_si128, _mm_movehdup_ps, _mm_movehl_ps, _mm_mul_ps, _mm_permute_ps, _mm_set1_ps,
    _mm_setzero_ps, _mm_srli_epi16, _mm_storeu_ps, _mm256_and_si256, _mm256_broadcastss_ps,
    _mm256_castps256_ps128, _mm256_cvtepi32_ps, _mm256_cvtph_ps, _mm256_dpbusd_avx_epi32,
    _mm256_extractf128_ps, _mm256_fmadd_ps, _mm256_loadu_si256, _mm256_madd_epi16,
    _mm256_maddubs_epi16, _mm256_set_m128i, _mm256_set1_epi8, _mm256_set1_epi16, _mm256_setzero_ps,
    _mm256_setzero_si256, _mm256_sign_epi8,
};

use super::{
    BLOCK, BlockType, GROUP, Kernels, Q4_1_BYTES, Q8_0_BYTES, QuantizedRow, checked_blocks,
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

/// Lane `R` of `v` in all eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lane<const R: i32>(v: __m128) -> __m256 {
    _mm256_broadcastss_ps(_mm_permute_ps::<R>(v))
}

/// `R * 0b01010101`: the shuffle that selects lane `R` everywhere.
const fn all(r: i32) -> i32 {
    r * 0b0101_0101
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

/// Stamps out the kernels for one set of target features and one way of
/// forming the products.
macro_rules! kernel_set {
    ($module:ident, $name:literal, $features:literal, $products:ident) => {
        mod $module {
            use super::*;

            pub(in super::super) const KERNELS: Kernels = Kernels {
                q4_1,
                q8_0,
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
                    acc[0] = _mm256_fmadd_ps(
                        lane::<{ all(0) }>(scales),
                        $products(unpack_q4(row(0)), a),
                        acc[0],
                    );
                    acc[1] = _mm256_fmadd_ps(
                        lane::<{ all(1) }>(scales),
                        $products(unpack_q4(row(1)), a),
                        acc[1],
                    );
                    acc[2] = _mm256_fmadd_ps(
                        lane::<{ all(2) }>(scales),
                        $products(unpack_q4(row(2)), a),
                        acc[2],
                    );
                    acc[3] = _mm256_fmadd_ps(
                        lane::<{ all(3) }>(scales),
                        $products(unpack_q4(row(3)), a),
                        acc[3],
                    );
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
                    acc[0] = _mm256_fmadd_ps(lane::<{ all(0) }>(scales), product(0), acc[0]);
                    acc[1] = _mm256_fmadd_ps(lane::<{ all(1) }>(scales), product(1), acc[1]);
                    acc[2] = _mm256_fmadd_ps(lane::<{ all(2) }>(scales), product(2), acc[2]);
                    acc[3] = _mm256_fmadd_ps(lane::<{ all(3) }>(scales), product(3), acc[3]);
                }
                std::array::from_fn(|r| hsum(acc[r]))
            }
        }
    };
}

kernel_set!(avx2, "avx2", "avx2,fma,f16c", products_avx2);
kernel_set!(vnni, "avx-vnni", "avx2,fma,f16c,avxvnni", products_vnni);
