//! Running plain Rust loops compiled for the CPU's wider vectors: the default x86-64 target
//! only has SSE2, so loops over channels vectorize 4 lanes wide; inside a function built for
//! AVX2 the same code runs 8 wide.
#![allow(unsafe_code)]

/// Runs `f` inside a function compiled with AVX2 where the CPU has it (so `f`, inlined into it,
/// is vectorized for AVX2), else as is. The result is the same either way: only integer and
/// IEEE float operations that AVX2 computes exactly alike are vectorized (no fused multiply-add
/// is enabled).
#[inline(always)]
pub(crate) fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above), the only requirement of `run`.
            return unsafe { run(f) };
        }
    }
    f()
}
