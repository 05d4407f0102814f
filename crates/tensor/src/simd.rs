//! Kernels compiled for the vector instructions the CPU has, chosen at run time: the build
//! targets baseline x86-64 (no AVX, no FMA) so that its binaries run anywhere, while the hot
//! loops of our own kernels (direct and scattered convolution, single-row GEMM) want AVX-512
//! or AVX2 with FMA. A kernel body is written once, generic over the instruction set's token
//! ([`crate::vector::Simd`]) and its vector width, and [`dispatched!`] compiles it per
//! instruction set behind one safe function.

/// Defines `$name`, which runs `$body::<S, LANES>(simd, args..)` compiled for the best
/// instruction set the CPU has, with its token `simd` of type `S` (see [`crate::vector`]) and
/// its vector width `LANES` (`S::LANES`, as a const parameter for kernels written on arrays of
/// lanes): [`Avx512`](crate::vector::Avx512) (16 lanes), [`Avx2`](crate::vector::Avx2) (8),
/// else [`Portable`](crate::vector::Portable) (8, multiply and add rounded separately).
macro_rules! dispatched {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident;) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                use $crate::vector::{Avx2, Avx512};
                // AVX-512VL too: without it, a register zeroed or moved by a 128- or 256-bit
                // instruction must be one of the first 16, and the allocator spilled sums to
                // the stack with zmm23-31 free.
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512(simd: Avx512, $($arg: $ty),*) $(-> $ret)? {
                    $body::<Avx512, 16>(simd, $($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2(simd: Avx2, $($arg: $ty),*) $(-> $ret)? {
                    $body::<Avx2, 8>(simd, $($arg),*)
                }
                // SAFETY: each function runs only with the token of the features it is
                // compiled for, which exists only on a CPU that has them.
                #[allow(unsafe_code)]
                if let Some(simd) = Avx512::detected() {
                    return unsafe { avx512(simd, $($arg),*) };
                } else if let Some(simd) = Avx2::detected() {
                    return unsafe { avx2(simd, $($arg),*) };
                }
            }
            $body::<$crate::vector::Portable, 8>($crate::vector::Portable, $($arg),*)
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
    /// AVX-512F and AVX-512VL with FMA: 16 lanes.
    Avx512,
}

/// The environment variable that caps the instruction set: `avx512` (no cap), `avx2` or
/// `baseline`, in any case; another value is reported on standard error and means no cap. For
/// running the tests of the narrower kernels on a wider CPU, and for reproducing another
/// machine's bits. It can only lower the choice, never enable features the CPU lacks.
pub const ISA_CAP_VARIABLE: &str = "TENSOR_ISA";

/// The cap a value of [`ISA_CAP_VARIABLE`] sets (unset: none), or what is wrong with it.
#[cfg(target_arch = "x86_64")]
fn isa_cap(value: Option<&str>) -> Result<Isa, String> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("avx512") => Ok(Isa::Avx512),
        Some("avx2") => Ok(Isa::Avx2),
        Some("baseline") => Ok(Isa::Baseline),
        Some(other) => Err(format!(
            "{ISA_CAP_VARIABLE}={other:?} is not avx512, avx2 or baseline: the kernels are not capped"
        )),
    }
}

#[cfg(target_arch = "x86_64")]
impl Isa {
    /// The best one this CPU has, capped by [`ISA_CAP_VARIABLE`] (decided once per process).
    pub(crate) fn detected() -> Self {
        static CHOICE: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            use std::arch::is_x86_feature_detected as has;
            let best = if has!("avx512f") && has!("avx512vl") && has!("avx2") && has!("fma") {
                Isa::Avx512
            } else if has!("avx2") && has!("fma") {
                Isa::Avx2
            } else {
                Isa::Baseline
            };
            let value = std::env::var(ISA_CAP_VARIABLE).ok();
            // A typo must not pass for a cap (CI runs the narrower kernels' tests with one):
            // said once, where whoever set it looks.
            let cap = isa_cap(value.as_deref()).unwrap_or_else(|problem| {
                eprintln!("warning: {problem}");
                Isa::Avx512
            });
            best.min(cap)
        })
    }
}

/// The instruction set this process's own kernels run with: `avx512`, `avx2` or `baseline`
/// (also their bits differ: a wider register sums in another order).
pub fn instruction_set() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        match Isa::detected() {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Baseline => "baseline",
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "baseline"
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

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::{Isa, isa_cap};

    #[test]
    fn the_cap_variable_takes_three_names_in_any_case_and_reports_others() {
        assert_eq!(isa_cap(None), Ok(Isa::Avx512));
        assert_eq!(isa_cap(Some("avx512")), Ok(Isa::Avx512));
        assert_eq!(isa_cap(Some("AVX2")), Ok(Isa::Avx2));
        assert_eq!(isa_cap(Some("Baseline")), Ok(Isa::Baseline));
        match isa_cap(Some("sse4")) {
            Err(problem) => assert!(problem.contains("TENSOR_ISA=\"sse4\""), "{problem}"),
            Ok(cap) => panic!("sse4 taken for {cap:?}"),
        }
    }
}
