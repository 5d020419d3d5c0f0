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

pub mod family;

pub use family::{scale_of, EMBEDDED_WIDTHS, MEMBERS, SCALES, SHAPES};
use family::{SCALE_MIN, SCALE_STEP};

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
    /// The decoder slots ([`Self::slots`]), built on first use: an encoder never reads them.
    slots: OnceLock<SlotArray>,
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
    /// Builds the family for residuals `-half_width ..= half_width` (`half_width` in 1..=63):
    /// from the frequencies embedded at build time for the built-in levels' widths
    /// ([`EMBEDDED_WIDTHS`]), else computed now (several ms).
    pub fn build(half_width: u32) -> Self {
        assert!((1..=63).contains(&half_width));
        let freqs =
            embedded_frequencies(half_width).unwrap_or_else(|| family::frequencies(half_width));
        let tables: Vec<ResidualTable> = freqs
            .chunks_exact(2 * half_width as usize + 1)
            .map(table_from_frequencies)
            .collect();
        let enc_packed = tables
            .iter()
            .flat_map(|t| t.enc.iter().flat_map(|e| e.packed()))
            .collect();
        Self {
            half_width,
            tables,
            slots: OnceLock::new(),
            enc_packed,
        }
    }

    /// Every member's [`PROB_SCALE`] decoder slots, member after member: member `k`'s table
    /// starts at `k · PROB_SCALE`. One array, so a SIMD decoder gathers from it with one base.
    /// Built on first use (3 MiB, about as long as the rest of the set takes to build).
    pub fn slots(&self) -> &SlotArray {
        self.slots.get_or_init(|| {
            let mut slots = Vec::with_capacity(self.tables.len() * PROB_SCALE as usize);
            for t in &self.tables {
                push_dec_slots(&t.freq, &mut slots);
            }
            SlotArray::new(&slots)
        })
    }

    /// The decoder slots of member `k`.
    pub fn member_slots(&self, k: usize) -> &[DecSlot; PROB_SCALE as usize] {
        let s = &self.slots()[k * PROB_SCALE as usize..(k + 1) * PROB_SCALE as usize];
        s.try_into().expect("PROB_SCALE slots")
    }

    /// The shared model set of `half_width`, built on first use, with what `role` needs.
    pub fn get(half_width: u32, role: ModelRole) -> Arc<Self> {
        let set = SETS[half_width as usize]
            .get_or_init(|| Arc::new(Self::build(half_width)))
            .clone();
        if role == ModelRole::Decode {
            set.slots();
        }
        set
    }

    /// Whether the model set of `half_width` is built (in this process) with what `role`
    /// needs.
    pub fn is_built(half_width: u32, role: ModelRole) -> bool {
        SETS.get(half_width as usize)
            .and_then(OnceLock::get)
            .is_some_and(|set| role == ModelRole::Encode || set.slots.get().is_some())
    }
}

/// Which coder a model set serves: an encoder reads the members' encoder symbols only, a
/// decoder also their decoder slots ([`ModelSet::slots`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelRole {
    /// Encoding.
    Encode,
    /// Decoding.
    Decode,
}

/// One cell per width: building one width (tens of ms) never holds up users of another.
static SETS: [OnceLock<Arc<ModelSet>>; 64] = [const { OnceLock::new() }; 64];

/// The frequencies of [`EMBEDDED_WIDTHS`], computed by the build script (`build.rs`, from
/// [`family::frequencies`]): u16 little-endian, width after width.
static EMBEDDED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/model_frequencies.bin"));

/// The embedded frequencies of `half_width`, if it is one of [`EMBEDDED_WIDTHS`].
fn embedded_frequencies(half_width: u32) -> Option<Vec<u32>> {
    let mut at = 0;
    for w in EMBEDDED_WIDTHS {
        let len = 2 * MEMBERS * (2 * w as usize + 1);
        if w == half_width {
            let bytes = EMBEDDED.get(at..at + len)?;
            return Some(
                bytes
                    .chunks_exact(2)
                    .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
            );
        }
        at += len;
    }
    None
}

/// The coder tables of one member from its frequencies (summing to [`PROB_SCALE`]).
fn table_from_frequencies(freq: &[u32]) -> ResidualTable {
    let (freq, n) = (freq.to_vec(), freq.len());
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
    use crate::Level;

    #[test]
    fn deterministic_exp_matches_libm() {
        for i in 0..2000 {
            let x = -(i as f64) * 0.0173;
            let (a, b) = (family::det_exp(x), x.exp());
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

    /// An encoder's model set has no decoder slots until something decodes with it.
    #[test]
    fn decoder_slots_are_built_on_first_decoding_use() {
        // Odd half-widths: no bin count gives one, so only this test builds them.
        let set = ModelSet::build(45);
        assert!(set.slots.get().is_none());
        assert_eq!(set.member_slots(member(1, 3, 1)).len(), PROB_SCALE as usize);
        assert_eq!(set.slots().len(), MEMBERS * PROB_SCALE as usize);
        // The shared sets: what each role needs.
        ModelSet::get(45, ModelRole::Encode);
        assert!(ModelSet::is_built(45, ModelRole::Encode));
        assert!(!ModelSet::is_built(45, ModelRole::Decode));
        ModelSet::get(45, ModelRole::Decode);
        assert!(ModelSet::is_built(45, ModelRole::Decode));
        assert!(!ModelSet::is_built(63, ModelRole::Encode));
    }

    /// The build script's tables are the ones computed at run time, and they cover every
    /// width a built-in level codes with.
    #[test]
    fn embedded_tables_are_the_computed_ones_and_cover_the_built_in_levels() {
        for w in EMBEDDED_WIDTHS {
            let embedded = embedded_frequencies(w).expect("embedded");
            assert_eq!(embedded, family::frequencies(w), "half-width {w}");
        }
        assert_eq!(embedded_frequencies(5), None);
        let sizes: usize = EMBEDDED_WIDTHS
            .iter()
            .map(|&w| 2 * MEMBERS * (2 * w as usize + 1))
            .sum();
        assert_eq!(EMBEDDED.len(), sizes);
        for level in [Level::CgHigh, Level::CgDefault, Level::CgLow] {
            for layers in [1, 2, 9, 10, 24, 32, 80, 126] {
                let (k, v) = level.bins(layers).expect("bins");
                for b in k.iter().chain(&v) {
                    let w = crate::quant::alphabet(u32::from(*b)) - 1;
                    assert!(
                        EMBEDDED_WIDTHS.contains(&w),
                        "{level:?} with {layers} layers codes half-width {w}"
                    );
                }
            }
        }
    }

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
