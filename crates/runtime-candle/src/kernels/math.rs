//! The element-wise and reduction maths of the forward pass, in safe Rust
//! written so the compiler vectorises it: fixed-width lanes instead of one
//! running sum, branch-free `exp`.
//!
//! Where llama.cpp's order of operations is known and cheap to follow (the
//! RMS norm's `f64` sum, softmax's `f64` denominator, SiLU as
//! `x / (1 + e^-x)`), it is followed, so greedy tokens match its own.

/// Lanes of the vectorised sums.
const LANES: usize = 8;

/// `e^x` for `x` in any range, to within two units in the last place:
/// Cephes' polynomial for `e^r` on `[-ln 2 / 2, ln 2 / 2]`, times `2^n`.
/// Arguments below -87.3 give about 1e-38 instead of a subnormal or zero,
/// which no sum here can tell apart.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    /// Adding and subtracting 1.5 × 2^23 rounds to the nearest integer, ties
    /// to even, with plain additions (no rounding instruction needed).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * r2 + r + 1.0;
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    e_r * two_n
}

/// `Σ a·b`, in eight lanes.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `y += a·x`.
#[inline]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `out = x / rms(x) · weight`, as llama.cpp: the mean of squares summed in
/// `f64`, the scale applied, then the weight.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mut lanes = [0f64; 4];
    let chunks = x.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().map(|v| f64::from(v * v)).sum();
    for chunk in chunks {
        for i in 0..4 {
            lanes[i] += f64::from(chunk[i] * chunk[i]);
        }
    }
    let sum = lanes.iter().sum::<f64>() + tail;
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((out, x), w) in out.iter_mut().zip(x).zip(weight) {
        *out = (x * scale) * w;
    }
}

/// `gate = silu(gate) · up`, SiLU as `x / (1 + e^-x)`.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

/// Softmax in place: `e^(x - max) / Σ`, the sum in `f64`.
pub(crate) fn softmax(x: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for chunk in chunks {
        for i in 0..LANES {
            lanes[i] = lanes[i].max(chunk[i]);
        }
    }
    max = lanes.iter().fold(max, |m, &v| m.max(v));
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let mut sums = [0f64; 4];
    let chunks = x.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
    for chunk in chunks {
        for i in 0..4 {
            sums[i] += f64::from(chunk[i]);
        }
    }
    let inverse = (1.0 / (sums.iter().sum::<f64>() + tail)) as f32;
    for v in x.iter_mut() {
        *v *= inverse;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulps_of_the_library_exp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            assert!(ulps(got, want) <= 2, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn exp_saturates_instead_of_overflowing_or_going_subnormal() {
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_the_order() {
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin() * 20.0).collect();
        let argmax = (0..37).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap();
        softmax(&mut x);
        let sum: f32 = x.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "{sum}");
        let new_argmax = (0..37).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap();
        assert_eq!(argmax, new_argmax);
    }

    #[test]
    fn rms_norm_gives_unit_root_mean_square_before_the_weight() {
        let x: Vec<f32> = (0..576).map(|i| (i as f32).cos() * 3.0).collect();
        let mut out = vec![0f32; 576];
        rms_norm(&x, &vec![1.0; 576], 1e-5, &mut out);
        let rms = (out.iter().map(|v| v * v).sum::<f32>() / 576.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-4, "{rms}");
    }

    #[test]
    fn dot_and_silu_match_their_definitions() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.05).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);

        let mut gate = vec![-3.0f32, 0.0, 2.0];
        silu_mul(&mut gate, &[1.0, 1.0, 2.0]);
        let silu = |x: f32| x / (1.0 + (-x).exp());
        for (got, want) in gate.iter().zip([silu(-3.0), 0.0, 2.0 * silu(2.0)]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }
}
