//! Entropy models of the native coder: a fixed family of discretized residual distributions,
//! built once per alphabet and shared by every block.
//!
//! The native coder does not ship frequency tables. Each (block, K/V, channel) picks one
//! member of this family — a shape, a scale and a half-symbol centre offset — and the
//! stream names it with a few bits (see [`crate::native`]). The tables are deterministic
//! functions of `(half_width, shape, scale, offset)`, computed with integer-exact
//! normalization, so encoder and decoder build identical ones on any machine.
//!
//! A member's density is `exp(-|x - c| / b)` (Laplace) or `exp(-(x - c)^2 / (2 b^2))`
//! (Gauss), with `c ∈ {0, 1/2}`, integrated over the unit bins of the residuals
//! `-half_width ..= half_width`, normalized to [`PROB_SCALE`] with every residual at least 1.

use std::sync::{Arc, OnceLock};

use crate::rans::{push_dec_slots, DecSlot, EncSymbol, PROB_SCALE};

/// Shapes in the family.
pub const SHAPES: usize = 2;
/// Scales per shape.
pub const SCALES: usize = 48;
/// Smallest scale (in symbols).
const SCALE_MIN: f64 = 0.08;
/// Ratio between consecutive scales.
const SCALE_STEP: f64 = 1.125;

/// The scale `b` (in symbol units) of scale index `i`: `SCALE_MIN · SCALE_STEP^i`, by repeated
/// multiplication (basic IEEE operations only, so every platform gets the same bits).
pub fn scale_of(i: usize) -> f64 {
    (0..i).fold(SCALE_MIN, |b, _| b * SCALE_STEP)
}

/// `e^x` for `x <= 0` from basic IEEE operations only (Cody–Waite reduction by ln 2 and a
/// degree-13 Taylor polynomial), so the tables built from it are bit-identical on every
/// platform; libm's `exp` may differ in the last bit between systems. Relative error < 1e-15.
fn det_exp(x: f64) -> f64 {
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

/// The scale index nearest (in log) to `b`.
pub fn scale_index(b: f64) -> usize {
    let k = ((b / SCALE_MIN).ln() / SCALE_STEP.ln()).round();
    if k.is_nan() || k < 0.0 {
        0
    } else {
        (k as usize).min(SCALES - 1)
    }
}

/// The index of the family member for (shape, scale, centre offset).
#[inline]
pub const fn member(shape: usize, scale: usize, offset: usize) -> usize {
    (shape * SCALES + scale) * 2 + offset
}

/// One bit in [`ResidualTable::cost_q`] units.
pub const COST_ONE: f64 = 4096.0;

/// Residual indices a table has room for (`2·63 + 1` used at most); fixed so that indexing
/// with a masked residual needs no bounds check.
pub const MAX_RESIDUALS: usize = 128;

/// One member of the family: encoder parameters and code lengths per residual.
#[derive(Debug)]
pub struct ResidualTable {
    /// Encoder parameters per residual index (`r + half_width`); entries past `2·half_width`
    /// are unused.
    pub enc: Box<[EncSymbol; MAX_RESIDUALS]>,
    /// Code length in bits per residual index.
    pub cost: Vec<f32>,
    /// Code length per residual index in 1/4096 bits (at most 12·4096, so that a histogram
    /// of up to 65535 counts prices in a `u32`, exactly and in any order).
    pub cost_q: Vec<u32>,
    /// Frequency per residual index.
    pub freq: Vec<u32>,
}

/// Every member for one residual alphabet `-half_width ..= half_width`.
#[derive(Debug)]
pub struct ModelSet {
    /// Largest |residual|.
    pub half_width: u32,
    /// `member(shape, scale, offset)` -> table.
    pub tables: Vec<ResidualTable>,
    /// Every member's [`PROB_SCALE`] decoder slots, member after member: member `k`'s table
    /// starts at `k · PROB_SCALE`. One array, so a SIMD decoder gathers from it with one base.
    pub slots: SlotArray,
    /// Every member's encoder symbols in [`EncSymbol::packed`] form, member after member:
    /// residual index `r` of member `k` at `2·(k · MAX_RESIDUALS + r)`.
    pub enc_packed: Vec<u32>,
}

/// The decoder slots of a model set: 3 MiB, read at uniformly random slots of up to 32
/// members at once, so it lives on 2 MiB pages where the kernel grants them (with 4 KiB
/// pages the TLB misses cost more than the decoding).
pub struct SlotArray {
    map: memmap2::MmapMut,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for SlotArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotArray({} slots)", self.len)
    }
}

impl SlotArray {
    const HUGE_PAGE: usize = 2 << 20;

    fn new(slots: &[DecSlot]) -> Self {
        let bytes = size_of_val(slots);
        // A mapping one huge page larger than needed holds a huge-page-aligned range.
        let mut map = memmap2::MmapMut::map_anon(bytes + Self::HUGE_PAGE)
            .unwrap_or_else(|e| panic!("cannot map {bytes} bytes of model tables: {e}"));
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let offset = map.as_ptr().align_offset(Self::HUGE_PAGE);
        let dst: &mut [DecSlot] = bytemuck::cast_slice_mut(&mut map[offset..offset + bytes]);
        dst.copy_from_slice(slots);
        Self {
            map,
            offset,
            len: slots.len(),
        }
    }
}

impl std::ops::Deref for SlotArray {
    type Target = [DecSlot];
    fn deref(&self) -> &[DecSlot] {
        bytemuck::cast_slice(&self.map[self.offset..self.offset + 4 * self.len])
    }
}

impl ModelSet {
    /// Builds the family for residuals `-half_width ..= half_width` (`half_width` in 1..=63).
    pub fn build(half_width: u32) -> Self {
        assert!((1..=63).contains(&half_width));
        let mut tables = Vec::with_capacity(SHAPES * SCALES * 2);
        for shape in 0..SHAPES {
            for scale in 0..SCALES {
                for offset in 0..2 {
                    let p = probabilities(half_width, shape, scale_of(scale), offset as f64 * 0.5);
                    tables.push(table_from_probabilities(&p));
                }
            }
        }
        let mut slots = Vec::with_capacity(tables.len() * PROB_SCALE as usize);
        for t in &tables {
            push_dec_slots(&t.freq, &mut slots);
        }
        let enc_packed = tables
            .iter()
            .flat_map(|t| t.enc.iter().flat_map(|e| e.packed()))
            .collect();
        Self {
            half_width,
            tables,
            slots: SlotArray::new(&slots),
            enc_packed,
        }
    }

    /// The decoder slots of member `k`.
    pub fn member_slots(&self, k: usize) -> &[DecSlot; PROB_SCALE as usize] {
        let s = &self.slots[k * PROB_SCALE as usize..(k + 1) * PROB_SCALE as usize];
        s.try_into().expect("PROB_SCALE slots")
    }

    /// The shared model set of `half_width`, built on first use.
    pub fn get(half_width: u32) -> Arc<Self> {
        SETS[half_width as usize]
            .get_or_init(|| Arc::new(Self::build(half_width)))
            .clone()
    }

    /// Whether the model set of `half_width` is built (in this process).
    pub fn is_built(half_width: u32) -> bool {
        SETS.get(half_width as usize)
            .is_some_and(|c| c.get().is_some())
    }
}

/// One cell per width: building one width (tens of ms) never holds up users of another.
static SETS: [OnceLock<Arc<ModelSet>>; 64] = [const { OnceLock::new() }; 64];

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

/// Normalizes masses to integer frequencies summing to PROB_SCALE (each >= 1) and builds the
/// coder tables. Deterministic: ties go to the lowest index.
fn table_from_probabilities(p: &[f64]) -> ResidualTable {
    let n = p.len();
    let total: f64 = p.iter().sum();
    let spare = (PROB_SCALE as usize - n) as f64;
    let mut freq: Vec<u32> = p
        .iter()
        .map(|&q| 1 + (q / total * spare).floor() as u32)
        .collect();
    let mut sum: u32 = freq.iter().sum();
    // Hand the rounding remainder to the largest masses, one each, deterministically.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let mut i = 0;
    while sum < PROB_SCALE {
        freq[order[i % n]] += 1;
        sum += 1;
        i += 1;
    }
    // Unused entries hold a valid symbol too, so that every entry packs.
    let mut enc = Box::new([EncSymbol::new(0, 1); MAX_RESIDUALS]);
    let mut cost = Vec::with_capacity(n);
    let mut cost_q = Vec::with_capacity(n);
    let mut start = 0u32;
    for (i, &f) in freq.iter().enumerate() {
        enc[i] = EncSymbol::new(start, f);
        cost.push((PROB_SCALE as f32 / f as f32).log2());
        cost_q.push(((PROB_SCALE as f64 / f as f64).log2() * COST_ONE).round() as u32);
        start += f;
    }
    ResidualTable {
        enc,
        cost,
        cost_q,
        freq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_exp_matches_libm() {
        for i in 0..2000 {
            let x = -(i as f64) * 0.0173;
            let (a, b) = (det_exp(x), x.exp());
            assert!((a - b).abs() <= 1e-15 * b + 1e-300, "x={x}: {a} vs {b}");
        }
    }

    /// The tables are part of the format: a decoder on any platform must rebuild exactly these
    /// frequencies. If this checksum changes, files written before the change stop decoding.
    #[test]
    fn tables_are_the_format_golden_checksum() {
        let mut crc = 0u32;
        for w in [5u32, 10, 14, 30, 62] {
            for t in &ModelSet::build(w).tables {
                let bytes: Vec<u8> = t
                    .freq
                    .iter()
                    .flat_map(|f| (*f as u16).to_le_bytes())
                    .collect();
                crc = crc32c::crc32c_append(crc, &bytes);
            }
        }
        assert_eq!(crc, GOLDEN_TABLES_CRC, "model tables changed: {crc:#010x}");
    }
    const GOLDEN_TABLES_CRC: u32 = 0xf048_132c;

    #[test]
    fn every_member_sums_to_scale_and_codes_every_residual() {
        let set = ModelSet::build(14);
        assert_eq!(set.tables.len(), SHAPES * SCALES * 2);
        for t in &set.tables {
            assert_eq!(t.freq.len(), 29);
            let sum: u32 = t.enc[..29].iter().map(|e| e.freq()).sum();
            assert_eq!(sum, PROB_SCALE);
            assert!(t.enc[..29].iter().all(|e| e.freq() >= 1));
        }
        // A narrow centred member puts most mass on residual 0.
        let t = &set.tables[member(0, 0, 0)];
        assert!(t.cost[14] < 0.1);
        // The half-offset member splits it between 0 and +1.
        let t = &set.tables[member(1, 0, 1)];
        assert!((t.cost[14] - t.cost[15]).abs() < 0.05);
    }
}
