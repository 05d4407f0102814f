//! Kernels compiled for the vector instructions the CPU has, chosen at run time: the build
//! targets baseline x86-64 (no AVX, no FMA) so that its binaries run anywhere, while the hot
//! loops of our own kernels (direct and scattered convolution, single-row GEMM) want AVX-512
//! or AVX2 with FMA. A kernel body is written once,
//! generic over [`MulAdd`] and its vector width, and [`dispatched!`] compiles it per instruction
//! set behind one safe function.

/// Defines `$name`, which runs `$body` compiled for the best instruction set the CPU has: with
/// AVX-512 (16 lanes) or AVX2 (8 lanes) and FMA, else the baseline target without FMA.
macro_rules! dispatched {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $body:ident;) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) {
                    $body::<$crate::simd::Fused, 16>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) {
                    $body::<$crate::simd::Fused, 8>($($arg),*)
                }
                // SAFETY: each function runs only on a CPU found to have the features it is
                // compiled for.
                #[allow(unsafe_code)]
                match $crate::simd::Isa::detected() {
                    $crate::simd::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::simd::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Isa::Baseline => {}
                }
            }
            $body::<$crate::simd::Separate, 8>($($arg),*)
        }
    };
}

pub(crate) use dispatched;

/// The vector instruction sets the bodies are compiled for, narrowest first.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// Neither of the below: the target's baseline (SSE2 on x86-64).
    Baseline,
    /// AVX2 with FMA: 8 lanes.
    Avx2,
    /// AVX-512F with FMA: 16 lanes.
    Avx512,
}

/// The environment variable that caps the instruction set: `avx2` or `baseline` (anything else
/// means no cap). For running the tests of the narrower kernels on a wider CPU, and for
/// reproducing another machine's bits. It can only lower the choice, never enable features
/// the CPU lacks.
pub const ISA_CAP_VARIABLE: &str = "TENSOR_ISA";

#[cfg(target_arch = "x86_64")]
impl Isa {
    /// The best one this CPU has, capped by [`ISA_CAP_VARIABLE`] (decided once per process).
    pub(crate) fn detected() -> Self {
        static CHOICE: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            use std::arch::is_x86_feature_detected as has;
            let best = if has!("avx512f") && has!("avx2") && has!("fma") {
                Isa::Avx512
            } else if has!("avx2") && has!("fma") {
                Isa::Avx2
            } else {
                Isa::Baseline
            };
            let cap = match std::env::var(ISA_CAP_VARIABLE).as_deref() {
                Ok("baseline") => Isa::Baseline,
                Ok("avx2") => Isa::Avx2,
                _ => Isa::Avx512,
            };
            best.min(cap)
        })
    }
}

/// A multiply-add, fused into one rounding or not: the bodies are generic over it so that one
/// source compiles both to FMA instructions and to the baseline target.
pub(crate) trait MulAdd {
    /// `a * b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// One rounding: the FMA instruction, for targets that have it.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Fused;

/// Two roundings: for the baseline target, where a fused multiply-add is a slow library call.
pub(crate) struct Separate;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// The sum of a vector's lanes, in a fixed pairwise order.
#[inline(always)]
pub(crate) fn tree_sum<const LANES: usize>(lanes: &[f32; LANES]) -> f32 {
    let mut half = *lanes;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            half[i] += half[i + n];
        }
    }
    half[0]
}
