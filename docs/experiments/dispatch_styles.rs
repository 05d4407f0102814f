//! One kernel (4 dot products of a row with 4 columns, lanes in arrays, fused multiply-add:
//! the shape of tensor's gemm::dots) dispatched three ways, timed on this CPU.
use std::time::Instant;

trait MulAdd { fn mul_add(a: f32, b: f32, c: f32) -> f32; }
struct Fused;
impl MulAdd for Fused { #[inline(always)] fn mul_add(a: f32, b: f32, c: f32) -> f32 { a.mul_add(b, c) } }

#[inline(always)]
fn dots_body<M: MulAdd, const LANES: usize>(x: &[f32], cols: [&[f32]; 4]) -> [f32; 4] {
    let mut sums = [[0.0f32; LANES]; 4];
    let n = x.len() / LANES * LANES;
    for i in (0..n).step_by(LANES) {
        let xs = &x[i..i + LANES];
        for (c, col) in cols.iter().enumerate() {
            let w = &col[i..i + LANES];
            for l in 0..LANES { sums[c][l] = M::mul_add(xs[l], w[l], sums[c][l]); }
        }
    }
    std::array::from_fn(|c| sums[c].iter().sum())
}

// 1. Hand-written: target_feature functions, runtime detection, `unsafe` calls (ours).
fn dots_ours(x: &[f32], cols: [&[f32]; 4]) -> [f32; 4] {
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn avx512(x: &[f32], cols: [&[f32]; 4]) -> [f32; 4] { dots_body::<Fused, 16>(x, cols) }
    #[target_feature(enable = "avx2,fma")]
    fn avx2(x: &[f32], cols: [&[f32]; 4]) -> [f32; 4] { dots_body::<Fused, 8>(x, cols) }
    if is_x86_feature_detected!("avx512f") { return unsafe { avx512(x, cols) }; }
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") { return unsafe { avx2(x, cols) }; }
    dots_body::<Fused, 8>(x, cols)
}

// 2. multiversion: the same body, clones and dispatch generated.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn dots_multiversion(x: &[f32], cols: [&[f32]; 4]) -> [f32; 4] {
    // The width is the selected target's.
    if multiversion::target::selected_target!().supports_feature_str("avx512f") {
        dots_body::<Fused, 16>(x, cols)
    } else {
        dots_body::<Fused, 8>(x, cols)
    }
}

// 3. pulp (stable: its widest is V3 = AVX2 + FMA; V4 needs the nightly feature).
struct Dots<'a>(&'a [f32], [&'a [f32]; 4]);
impl pulp::WithSimd for Dots<'_> {
    type Output = [f32; 4];
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) -> [f32; 4] {
        let (x, _) = S::as_simd_f32s(self.0);
        let mut acc = [simd.splat_f32s(0.0); 4];
        for (c, col) in self.1.iter().enumerate() {
            let (w, _) = S::as_simd_f32s(col);
            for (a, b) in x.iter().zip(w) { acc[c] = simd.mul_add_e_f32s(*a, *b, acc[c]); }
        }
        std::array::from_fn(|c| simd.reduce_sum_f32s(acc[c]))
    }
}
fn dots_pulp(arch: pulp::Arch, x: &[f32], cols: [&[f32]; 4]) -> [f32; 4] { arch.dispatch(Dots(x, cols)) }

fn time(name: &str, mut f: impl FnMut() -> f32, flops: f64) {
    let mut best = f64::MAX;
    let mut sink = 0.0;
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..2000 { sink += f(); }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{name:<14} {:>6.1} GFLOP/s (sink {sink:.1})", flops * 2000.0 / best / 1e9);
}

fn main() {
    let n = 2048; // in L1: the kernel, not memory, is measured
    let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.1).collect();
    let c: Vec<Vec<f32>> = (0..4).map(|k| (0..n).map(|i| ((i + k) % 5) as f32 * 0.2).collect()).collect();
    let cols = [&c[0][..], &c[1][..], &c[2][..], &c[3][..]];
    let flops = 2.0 * 4.0 * n as f64;
    let arch = pulp::Arch::new();
    for _ in 0..2 {
        time("hand-written", || dots_ours(&x, cols)[0], flops);
        time("multiversion", || dots_multiversion(&x, cols)[0], flops);
        time("pulp (V3)", || dots_pulp(arch, &x, cols)[0], flops);
    }
}
