//! Compression levels and their per-layer bin tables.
//!
//! | level | quantizer | entropy coder | bins K / V (L = layers) |
//! |---|---|---|---|
//! | `raw` | none (bit-exact) | none | — |
//! | `q8` | per-token absmax, 256 bins | none (1 byte per element) | 256 / 256 |
//! | `cg-high` | per-token absmax | native | 32 everywhere |
//! | `cg-default` | per-token absmax | native | K 32 for layers 0-9 then 16; V 32 for layers 0-1 then 16 (LMCache default; all 32 if L < 10) |
//! | `cg-low` | per-token absmax | native | K 16 for the first ⌈20L/32⌉ layers then 12; V 16 for layers 0-1 then 12 (CacheGen's `QUANT_LEVEL=1`, scaled to L) |
//! | `lmcache` | per-token absmax | LMCache's range coder, CDFs shipped per chunk | as `cg-default` |

/// A compression level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// The bytes as they are.
    Raw,
    /// 8-bit per-token absmax quantization without entropy coding (CacheGen's baseline).
    Q8,
    /// 32 bins in every layer, native coder.
    CgHigh,
    /// LMCache's default bins, native coder.
    CgDefault,
    /// CacheGen's lowest-quality bins, native coder.
    CgLow,
    /// LMCache's bins and coder, bit-exact with the reference.
    Lmcache,
}

impl Level {
    /// Every level, from largest output to smallest.
    pub const ALL: [Self; 6] = [
        Self::Raw,
        Self::Q8,
        Self::CgHigh,
        Self::CgDefault,
        Self::CgLow,
        Self::Lmcache,
    ];

    /// Name as the CLI spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Q8 => "q8",
            Self::CgHigh => "cg-high",
            Self::CgDefault => "cg-default",
            Self::CgLow => "cg-low",
            Self::Lmcache => "lmcache",
        }
    }

    /// Code in the bitstream header.
    pub const fn code(self) -> u8 {
        match self {
            Self::Raw => 0,
            Self::Q8 => 1,
            Self::CgHigh => 2,
            Self::CgDefault => 3,
            Self::CgLow => 4,
            Self::Lmcache => 5,
        }
    }

    /// The level of a header code.
    pub const fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Self::Raw),
            1 => Some(Self::Q8),
            2 => Some(Self::CgHigh),
            3 => Some(Self::CgDefault),
            4 => Some(Self::CgLow),
            5 => Some(Self::Lmcache),
            _ => None,
        }
    }

    /// Whether the level quantizes (everything but `raw`).
    pub const fn is_lossy(self) -> bool {
        !matches!(self, Self::Raw)
    }

    /// Bins per layer for K and V, or `None` for `raw`.
    pub fn bins(self, layers: usize) -> Option<(Vec<u8>, Vec<u8>)> {
        let table = |first: usize, a: u32, b: u32| -> Vec<u8> {
            (0..layers)
                .map(|l| if l < first { a } else { b } as u8)
                .collect()
        };
        match self {
            Self::Raw => None,
            // 256 bins do not fit a u8: the header stores q8's bins as 0 (see FORMAT.md).
            Self::Q8 => Some((vec![0; layers], vec![0; layers])),
            Self::CgHigh => Some((table(layers, 32, 32), table(layers, 32, 32))),
            Self::CgDefault | Self::Lmcache => {
                if layers < 10 {
                    Some((table(layers, 32, 32), table(layers, 32, 32)))
                } else {
                    Some((table(10, 32, 16), table(2, 32, 16)))
                }
            }
            Self::CgLow => Some((table((20 * layers).div_ceil(32), 16, 12), table(2, 16, 12))),
        }
    }
}

/// The bin count a header byte stands for (0 means 256).
pub(crate) const fn bins_of_byte(b: u8) -> u32 {
    if b == 0 {
        256
    } else {
        b as u32
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown level {s:?} (expected one of: {})",
                    Self::ALL.map(|l| l.name()).join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lmcache_default_bins_for_32_layers() {
        let (k, v) = Level::CgDefault.bins(32).unwrap();
        assert_eq!(k[9], 32);
        assert_eq!(k[10], 16);
        assert_eq!(v[1], 32);
        assert_eq!(v[2], 16);
        let (k, v) = Level::CgLow.bins(32).unwrap();
        assert_eq!((k[19], k[20], v[1], v[2]), (16, 12, 16, 12));
        assert_eq!(Level::CgDefault.bins(8).unwrap().0, vec![32; 8]);
        for l in Level::ALL {
            assert_eq!(l.name().parse::<Level>(), Ok(l));
            assert_eq!(Level::from_code(l.code()), Some(l));
        }
    }
}
