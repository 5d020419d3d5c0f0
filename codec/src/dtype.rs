//! Element types of a KV cache and their conversions to and from `f32`.

use half::{bf16, f16, slice::HalfFloatSliceExt};

/// The element type of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary16.
    F16,
    /// bfloat16 (the upper half of an `f32`).
    BF16,
    /// IEEE 754 binary32.
    F32,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Self::F16 | Self::BF16 => 2,
            Self::F32 => 4,
        }
    }

    /// The code stored in the bitstream header (FORMAT.md).
    pub const fn code(self) -> u8 {
        match self {
            Self::F16 => 1,
            Self::BF16 => 2,
            Self::F32 => 3,
        }
    }

    /// The dtype of a header code.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::F16),
            2 => Some(Self::BF16),
            3 => Some(Self::F32),
            _ => None,
        }
    }

    /// The largest finite value of this dtype, as `f32`.
    pub const fn max_finite(self) -> f32 {
        match self {
            Self::F16 => 65504.0,
            Self::BF16 => 3.389_531_4e38,
            Self::F32 => f32::MAX,
        }
    }

    /// Lower-case name (`f16`, `bf16`, `f32`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::F32 => "f32",
        }
    }

    /// The 16-bit type in which per-token scales of this dtype are stored: the dtype itself
    /// for 16-bit input (an absmax is one of the input's own values, so it is exact), bf16 for
    /// `f32` input (same exponent range; rounded up so no value exceeds its scale).
    pub const fn scale_dtype(self) -> Self {
        match self {
            Self::F16 => Self::F16,
            Self::BF16 | Self::F32 => Self::BF16,
        }
    }

    /// The 16 stored bits of a per-token scale `m` (an absmax) of input in this dtype: exact
    /// for 16-bit input, rounded up to bf16 for `f32` input.
    #[inline]
    pub fn scale_bits(self, m: f32) -> u16 {
        match self {
            Self::F16 => f16::from_f32(m).to_bits(),
            Self::BF16 | Self::F32 => bf16_bits_round_up(m),
        }
    }

    /// The value of stored scale bits (see [`Self::scale_bits`]).
    #[inline]
    pub fn scale_value(self, bits: u16) -> f32 {
        self.scale_dtype().f32_from_bits(bits as u32)
    }

    /// Reads little-endian elements of this dtype from `src` into `dst` (one per element).
    ///
    /// # Panics
    /// If `src.len() != dst.len() * self.size()` (a caller bug, never input-derived).
    #[inline]
    pub fn load_f32(self, src: &[u8], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len() * self.size());
        match self {
            Self::F16 => match bytemuck::try_cast_slice::<u8, f16>(src) {
                // Aligned (the usual case): the vectorized conversion (F16C where present).
                Ok(h) if cfg!(target_endian = "little") => h.convert_to_f32_slice(dst),
                _ => {
                    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                        *d = f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
                    }
                }
            },
            Self::BF16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
                }
            }
            Self::F32 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
        }
    }

    /// Converts `v` to this dtype (round to nearest even) and returns its little-endian bits,
    /// widened to `u32`.
    #[inline]
    pub fn bits_from_f32(self, v: f32) -> u32 {
        match self {
            Self::F16 => f16::from_f32(v).to_bits() as u32,
            Self::BF16 => bf16::from_f32(v).to_bits() as u32,
            Self::F32 => v.to_bits(),
        }
    }

    /// The `f32` value of this dtype's bits (as produced by [`Self::bits_from_f32`]).
    #[inline]
    pub fn f32_from_bits(self, bits: u32) -> f32 {
        match self {
            Self::F16 => f16::from_bits(bits as u16).to_f32(),
            Self::BF16 => bf16::from_bits(bits as u16).to_f32(),
            Self::F32 => f32::from_bits(bits),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "float16" | "fp16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            "f32" | "float32" | "fp32" => Ok(Self::F32),
            other => Err(format!(
                "unknown dtype {other:?} (expected f16, bf16 or f32)"
            )),
        }
    }
}

/// Rounds a non-negative `f32` scale up to the nearest bf16 value (so no element exceeds it).
#[inline]
pub(crate) fn bf16_bits_round_up(v: f32) -> u16 {
    let b = bf16::from_f32(v);
    if b.to_f32() >= v {
        b.to_bits()
    } else {
        b.to_bits() + 1
    }
}
