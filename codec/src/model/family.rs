//! The family's frequencies: how each member's density is integrated over the residual bins
//! and normalized to integers. Basic IEEE operations only, so every platform computes the
//! same bits. Std-only and free of crate items: the build script compiles this file too, to
//! embed the tables of the widths the built-in levels use ([`EMBEDDED_WIDTHS`]).

/// Bits of probability precision: every member's frequencies sum to `1 << PROB_BITS`.
pub const PROB_BITS: u32 = 12;
/// Shapes in the family.
pub const SHAPES: usize = 2;
/// Scales per shape.
pub const SCALES: usize = 48;
/// Members per width: every shape, scale and centre offset.
pub const MEMBERS: usize = SHAPES * SCALES * 2;
/// Smallest scale (in symbols).
pub const SCALE_MIN: f64 = 0.08;
/// Ratio between consecutive scales.
pub const SCALE_STEP: f64 = 1.125;
/// Half-widths whose frequencies are computed when the crate is built and embedded in it:
/// the residuals of 12, 16 and 32 bins, which `cg-low`, `cg-default` and `cg-high` use
/// (a test checks that every built-in level's are here). Computing a width's takes several
/// ms of CPU, which a short-lived sender would otherwise pay before its first block.
pub const EMBEDDED_WIDTHS: [u32; 3] = [10, 14, 30];

/// The scale `b` (in symbol units) of scale index `i`: `SCALE_MIN · SCALE_STEP^i`, by repeated
/// multiplication (basic IEEE operations only, so every platform gets the same bits).
pub fn scale_of(i: usize) -> f64 {
    (0..i).fold(SCALE_MIN, |b, _| b * SCALE_STEP)
}

/// `e^x` for `x <= 0` from basic IEEE operations only (Cody–Waite reduction by ln 2 and a
/// degree-13 Taylor polynomial), so the tables built from it are bit-identical on every
/// platform; libm's `exp` may differ in the last bit between systems. Relative error < 1e-15.
pub fn det_exp(x: f64) -> f64 {
    if x < -700.0 {
        return 0.0;
    }
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let k = (x * std::f64::consts::LOG2_E).round();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Horner form of sum r^i / i!, i = 0..=13.
    let mut p = 1.0 / 6_227_020_800.0;
    for d in (1..=12).rev() {
        p = p * r + 1.0 / (1..=d).map(|v| v as f64).product::<f64>();
    }
    p = p * r + 1.0;
    p * f64::from_bits(((k as i64 + 1023) as u64) << 52)
}

/// Unnormalized bin masses of one member.
fn probabilities(half_width: u32, shape: usize, b: f64, c: f64) -> Vec<f64> {
    let w = half_width as i32;
    let density = |x: f64| -> f64 {
        let z = (x - c) / b;
        match shape {
            0 => det_exp(-z.abs()),
            _ => det_exp(-0.5 * z * z),
        }
    };
    // Midpoint rule with steps fine enough for the narrowest member.
    let steps = ((16.0 / b).ceil() as usize).clamp(8, 256);
    (-w..=w)
        .map(|r| {
            let lo = r as f64 - 0.5;
            let h = 1.0 / steps as f64;
            (0..steps)
                .map(|i| density(lo + (i as f64 + 0.5) * h))
                .sum::<f64>()
                * h
        })
        .collect()
}

/// Normalizes masses to integer frequencies summing to `1 << PROB_BITS`, each at least 1.
/// Deterministic: the rounding remainder goes to the largest masses, ties to the lowest index.
fn normalize(p: &[f64]) -> Vec<u32> {
    let scale = 1u32 << PROB_BITS;
    let n = p.len();
    let total: f64 = p.iter().sum();
    let spare = (scale as usize - n) as f64;
    let mut freq: Vec<u32> = p
        .iter()
        .map(|&q| 1 + (q / total * spare).floor() as u32)
        .collect();
    let mut sum: u32 = freq.iter().sum();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let mut i = 0;
    while sum < scale {
        freq[order[i % n]] += 1;
        sum += 1;
        i += 1;
    }
    freq
}

/// The frequencies of residuals `-half_width ..= half_width` under every member of the family
/// (`half_width` in 1..=63), member after member in the order of `member(shape, scale,
/// offset)`: shape, then scale, then centre offset.
pub fn frequencies(half_width: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(MEMBERS * (2 * half_width as usize + 1));
    for shape in 0..SHAPES {
        for scale in 0..SCALES {
            for offset in 0..2 {
                let p = probabilities(half_width, shape, scale_of(scale), offset as f64 * 0.5);
                out.extend(normalize(&p));
            }
        }
    }
    out
}
