//! Explicit vector registers, for kernels whose loops the compiler vectorizes badly: given the
//! weight-gradient loop of a 3x3 convolution as arrays of lanes, it kept the sums in memory for
//! one channel count and vectorized across the taps (with shuffles) for another, a 3x swing
//! between two instantiations of one source. Kernels written against [`Simd`] get the
//! instructions they spell out.
//!
//! An instruction set is a zero-sized token implementing [`Simd`]. A token of a feature-specific
//! type is made only after the CPU was found to have the features ([`crate::simd::dispatched!`]
//! makes them), which is what makes its safe methods sound: the intrinsics they run exist on this CPU.

use crate::conv::NO_GRADIENT;
use crate::simd::{MulAdd, Separate, tree_sum};

/// How the windows of a 2x2 pooling (stride 2) lie over the plane it pools, for
/// [`Simd::maxima_in_pixel_order`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaximaGrid {
    /// Windows to a pooled row.
    pub(crate) pool_w: usize,
    /// The width of the pooled plane.
    pub(crate) out_w: usize,
    /// The width of the padded input image, for the receptive fields' starts.
    pub(crate) padded_w: usize,
}

/// Where [`Simd::maxima_in_pixel_order`] writes, each with room for 16 more values than the
/// windows, as whole registers may be stored past the count.
pub(crate) struct MaximaOut<'a> {
    /// Each window's maximum, a pixel of the pooled plane.
    pub(crate) pixels: &'a mut [u32],
    /// That pixel's index in the padded image.
    pub(crate) starts: &'a mut [u32],
    /// The window's gradient, as bits.
    pub(crate) grads: &'a mut [u32],
}

/// The lane of [`Simd::block_3x3`] that holds 1.
pub(crate) const BLOCK_3X3_ONE: usize = 11;

/// The lane of [`Simd::block_5x5`]'s two registers, counted across both, that holds 1.
pub(crate) const BLOCK_5X5_ONE: usize = 25;

/// Vector arithmetic on one instruction set; `self` is the proof that the CPU has it.
pub(crate) trait Simd: Copy {
    /// Its scalar multiply-add: fused where the instruction set has FMA. (For kernels written
    /// on arrays of lanes, which the compiler vectorizes.)
    type MulAdd: MulAdd;
    /// One register of lanes.
    type V: Copy;
    /// Lanes in a register.
    const LANES: usize;
    /// Every lane `v`.
    fn splat(self, v: f32) -> Self::V;
    /// `from[..LANES]`.
    fn load(self, from: &[f32]) -> Self::V;
    /// Writes `to[..LANES]`.
    fn store(self, v: Self::V, to: &mut [f32]);
    /// `a * b + c`, with one rounding where the instruction set has FMA.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// The sum of the lanes, pairwise in the fixed order of [`tree_sum`].
    fn sum(self, v: Self::V) -> f32;
    /// Writes the transpose of the 8x8 block `src[r * src_stride + c]` (r, c < 8) into
    /// `dst[c * dst_stride + r]`.
    fn transpose_8x8(self, src: &[f32], src_stride: usize, dst: &mut [f32], dst_stride: usize);
    /// Splits `pairs[..2 * LANES]` into its even-indexed values, written to `even[..LANES]`,
    /// and its odd-indexed ones, to `odd[..LANES]` (the two columns of 2-wide windows).
    fn deinterleave(self, pairs: &[f32], even: &mut [f32], odd: &mut [f32]);
    /// The 3x3 block of a plane whose rows are `stride` apart, starting at `rows[0]`, and a 1:
    /// lane `4 * r + c` holds `rows[r * stride + c]` (r, c < 3), lane [`BLOCK_3X3_ONE`] holds
    /// 1 (so that a multiply-add by g also sums g), every other lane 0. None where a register
    /// has fewer than 12 lanes.
    #[inline(always)]
    fn block_3x3(self, rows: &[f32], stride: usize) -> Option<Self::V> {
        let _ = (rows, stride);
        None
    }
    /// The 5x5 block of a plane whose rows are `stride` (at least 5) apart, starting at
    /// `rows[0]`, and a 1, in two registers: lane `5 * r + c` counted across both holds
    /// `rows[r * stride + c]` (r, c < 5), lane [`BLOCK_5X5_ONE`] holds 1, the six after it 0.
    /// None where a register has fewer than 16 lanes.
    #[inline(always)]
    fn block_5x5(self, rows: &[f32], stride: usize) -> Option<[Self::V; 2]> {
        let _ = (rows, stride);
        None
    }
    /// Takes the windows of one plane of 2x2 pooling (stride 2, laid out as `grid` says) whose
    /// `argmax` is a pixel (not NO_GRADIENT) in pixel order, and writes each one's pixel, that
    /// pixel's index in the padded image and its gradient `dy` to the front of `out`; returns
    /// how many. None unless every pixel is in its own window, which makes pixel order each
    /// pooled row's windows with their maximum in the top row, then those with it in the
    /// bottom row.
    #[inline(always)]
    fn maxima_in_pixel_order(
        self,
        dy: &[f32],
        argmax: &[u32],
        grid: MaximaGrid,
        out: MaximaOut<'_>,
    ) -> Option<usize> {
        let MaximaGrid {
            pool_w,
            out_w,
            padded_w,
        } = grid;
        let (mut count, mut owned) = (0, true);
        let windows = dy.chunks_exact(pool_w).zip(argmax.chunks_exact(pool_w));
        for (i, (dy, argmax)) in windows.enumerate() {
            let top_left = 2 * i * out_w;
            for bottom in [false, true] {
                let row = 2 * i + usize::from(bottom);
                let offset = if bottom { out_w } else { 0 };
                // Pixel (row, c) is `row * out_w + c` in the plane, `row * padded_w + c` padded.
                let shift = (row * (padded_w - out_w)) as u32;
                // Every window is written and only one in this row advances the count: no
                // branch to mispredict.
                for (j, (&g, &at)) in dy.iter().zip(argmax).enumerate() {
                    let from_corner = at.wrapping_sub((top_left + 2 * j) as u32);
                    (out.pixels[count], out.starts[count]) = (at, at.wrapping_add(shift));
                    out.grads[count] = g.to_bits();
                    count += usize::from(from_corner.wrapping_sub(offset as u32) < 2);
                    let own = (from_corner < 2) | (from_corner.wrapping_sub(out_w as u32) < 2);
                    owned &= own | (at == NO_GRADIENT);
                }
            }
        }
        owned.then_some(count)
    }
    /// Writes the index i of each nonzero `values[i]` (a NaN is nonzero, -0.0 is not) to the
    /// front of `out` in order and returns how many; `out` needs `values.len() + LANES` room,
    /// as whole registers may be stored past the count.
    #[inline(always)]
    fn nonzero_positions(self, values: &[f32], out: &mut [u32]) -> usize {
        // Every entry is written and only a nonzero advances the count: no branch to
        // mispredict on a pooled gradient's random pattern.
        let mut count = 0;
        for (p, &v) in (0..).zip(values) {
            out[count] = p;
            count += usize::from(v != 0.0);
        }
        count
    }
}

/// No vector instructions beyond the target's baseline: eight lanes in an array, multiply and
/// add rounded separately (a fused multiply-add is a slow library call there).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

impl Simd for Portable {
    type MulAdd = Separate;
    type V = [f32; 8];
    const LANES: usize = 8;

    #[inline(always)]
    fn splat(self, v: f32) -> [f32; 8] {
        [v; 8]
    }

    #[inline(always)]
    fn load(self, from: &[f32]) -> [f32; 8] {
        std::array::from_fn(|l| from[l])
    }

    #[inline(always)]
    fn store(self, v: [f32; 8], to: &mut [f32]) {
        to[..8].copy_from_slice(&v);
    }

    #[inline(always)]
    fn mul_add(self, a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|l| a[l] * b[l] + c[l])
    }

    #[inline(always)]
    fn add(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|l| a[l] + b[l])
    }

    #[inline(always)]
    fn sum(self, v: [f32; 8]) -> f32 {
        tree_sum(&v)
    }

    #[inline(always)]
    fn transpose_8x8(self, src: &[f32], src_stride: usize, dst: &mut [f32], dst_stride: usize) {
        for r in 0..8 {
            for c in 0..8 {
                dst[c * dst_stride + r] = src[r * src_stride + c];
            }
        }
    }

    #[inline(always)]
    fn deinterleave(self, pairs: &[f32], even: &mut [f32], odd: &mut [f32]) {
        for ((pair, even), odd) in pairs[..16]
            .chunks_exact(2)
            .zip(&mut even[..8])
            .zip(&mut odd[..8])
        {
            (*even, *odd) = (pair[0], pair[1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

// The one place outside dispatch that runs intrinsics; each unsafe block is sound because a
// token exists only on a CPU with its features, and every pointer comes from a slice that was
// checked to hold a whole register.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MaximaGrid, MaximaOut, Simd};
    use crate::conv::NO_GRADIENT;
    use crate::simd::{Fused, Isa};

    /// [`Simd::transpose_8x8`] by AVX: unpack pairs of rows, then pairs of pairs, then swap
    /// 128-bit halves (24 shuffles for 64 values; element by element, the layout copies of
    /// the implicit GEMM took a quarter of a convolution's time).
    ///
    /// # Safety
    /// The CPU must have AVX.
    #[inline(always)]
    unsafe fn transpose_8x8_avx(
        src: &[f32],
        src_stride: usize,
        dst: &mut [f32],
        dst_stride: usize,
    ) {
        let src = &src[..7 * src_stride + 8];
        let dst = &mut dst[..7 * dst_stride + 8];
        // SAFETY: the caller has AVX; rows r < 8 start at r * stride and hold eight values
        // within the slices checked above.
        unsafe {
            let row = |r: usize| _mm256_loadu_ps(src.as_ptr().add(r * src_stride));
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            let (r4, r5, r6, r7) = (row(4), row(5), row(6), row(7));
            let t0 = _mm256_unpacklo_ps(r0, r1);
            let t1 = _mm256_unpackhi_ps(r0, r1);
            let t2 = _mm256_unpacklo_ps(r2, r3);
            let t3 = _mm256_unpackhi_ps(r2, r3);
            let t4 = _mm256_unpacklo_ps(r4, r5);
            let t5 = _mm256_unpackhi_ps(r4, r5);
            let t6 = _mm256_unpacklo_ps(r6, r7);
            let t7 = _mm256_unpackhi_ps(r6, r7);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let columns = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (c, column) in columns.into_iter().enumerate() {
                _mm256_storeu_ps(dst.as_mut_ptr().add(c * dst_stride), column);
            }
        }
    }

    /// AVX2 with FMA: eight lanes.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2(());

    impl Avx2 {
        /// The token, when the CPU has AVX2 and FMA (and they are not capped).
        pub(crate) fn detected() -> Option<Self> {
            (Isa::detected() >= Isa::Avx2).then_some(Avx2(()))
        }
    }

    impl Simd for Avx2 {
        type MulAdd = Fused;
        type V = __m256;
        const LANES: usize = 8;

        #[inline(always)]
        fn splat(self, v: f32) -> __m256 {
            // SAFETY: the token proves AVX.
            unsafe { _mm256_set1_ps(v) }
        }

        #[inline(always)]
        fn load(self, from: &[f32]) -> __m256 {
            let from = &from[..8];
            // SAFETY: the token proves AVX; `from` holds eight values.
            unsafe { _mm256_loadu_ps(from.as_ptr()) }
        }

        #[inline(always)]
        fn store(self, v: __m256, to: &mut [f32]) {
            let to = &mut to[..8];
            // SAFETY: the token proves AVX; `to` holds eight values.
            unsafe { _mm256_storeu_ps(to.as_mut_ptr(), v) }
        }

        #[inline(always)]
        fn mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: the token proves FMA.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }

        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: the token proves AVX.
            unsafe { _mm256_add_ps(a, b) }
        }

        #[inline(always)]
        fn sum(self, v: __m256) -> f32 {
            // SAFETY: the token proves AVX. Halves added as `tree_sum` adds them: lane i to
            // lane i + 4, then i + 2, then i + 1.
            unsafe {
                let quarter = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let eighth = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
                _mm_cvtss_f32(_mm_add_ss(eighth, _mm_movehdup_ps(eighth)))
            }
        }

        #[inline(always)]
        fn transpose_8x8(self, src: &[f32], src_stride: usize, dst: &mut [f32], dst_stride: usize) {
            // SAFETY: the token proves AVX.
            unsafe { transpose_8x8_avx(src, src_stride, dst, dst_stride) }
        }

        #[inline(always)]
        fn deinterleave(self, pairs: &[f32], even: &mut [f32], odd: &mut [f32]) {
            let (pairs, even, odd) = (&pairs[..16], &mut even[..8], &mut odd[..8]);
            // SAFETY: the token proves AVX and AVX2; the slices hold 16, 8 and 8 values.
            // Within each 128-bit half, `shuffle_ps` picks lanes 0, 2 (or 1, 3) of `low` then
            // of `high`; the 64-bit permute puts the halves' pairs back in order.
            unsafe {
                let low = _mm256_loadu_ps(pairs.as_ptr());
                let high = _mm256_loadu_ps(pairs.as_ptr().add(8));
                let evens = _mm256_shuffle_ps::<0b10_00_10_00>(low, high);
                let odds = _mm256_shuffle_ps::<0b11_01_11_01>(low, high);
                let evens = _mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(evens));
                let odds = _mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(odds));
                _mm256_storeu_ps(even.as_mut_ptr(), _mm256_castpd_ps(evens));
                _mm256_storeu_ps(odd.as_mut_ptr(), _mm256_castpd_ps(odds));
            }
        }
    }

    /// AVX-512F and AVX-512VL with FMA: sixteen lanes.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512(());

    impl Avx512 {
        /// The token, when the CPU has AVX-512F, AVX-512VL, AVX2 and FMA (and they are not capped).
        pub(crate) fn detected() -> Option<Self> {
            (Isa::detected() >= Isa::Avx512).then_some(Avx512(()))
        }
    }

    impl Simd for Avx512 {
        type MulAdd = Fused;
        type V = __m512;
        const LANES: usize = 16;

        #[inline(always)]
        fn splat(self, v: f32) -> __m512 {
            // SAFETY: the token proves AVX-512F.
            unsafe { _mm512_set1_ps(v) }
        }

        #[inline(always)]
        fn load(self, from: &[f32]) -> __m512 {
            let from = &from[..16];
            // SAFETY: the token proves AVX-512F; `from` holds sixteen values.
            unsafe { _mm512_loadu_ps(from.as_ptr()) }
        }

        #[inline(always)]
        fn store(self, v: __m512, to: &mut [f32]) {
            let to = &mut to[..16];
            // SAFETY: the token proves AVX-512F; `to` holds sixteen values.
            unsafe { _mm512_storeu_ps(to.as_mut_ptr(), v) }
        }

        #[inline(always)]
        fn mul_add(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: the token proves AVX-512F.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }

        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: the token proves AVX-512F.
            unsafe { _mm512_add_ps(a, b) }
        }

        #[inline(always)]
        fn sum(self, v: __m512) -> f32 {
            // SAFETY: the token proves AVX-512F (and so AVX). Halves added as `tree_sum` adds
            // them: lane i to lane i + 8, then i + 4, i + 2, i + 1.
            unsafe {
                let low = _mm512_castps512_ps256(v);
                let high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
                let half = _mm256_add_ps(low, high);
                let quarter =
                    _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
                let eighth = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
                _mm_cvtss_f32(_mm_add_ss(eighth, _mm_movehdup_ps(eighth)))
            }
        }

        #[inline(always)]
        fn transpose_8x8(self, src: &[f32], src_stride: usize, dst: &mut [f32], dst_stride: usize) {
            // SAFETY: the token proves AVX-512F, AVX2 and FMA (and so AVX).
            unsafe { transpose_8x8_avx(src, src_stride, dst, dst_stride) }
        }

        #[inline(always)]
        fn deinterleave(self, pairs: &[f32], even: &mut [f32], odd: &mut [f32]) {
            let (pairs, even, odd) = (&pairs[..32], &mut even[..16], &mut odd[..16]);
            // SAFETY: the token proves AVX-512F; the slices hold 32, 16 and 16 values. Index
            // i < 16 of the two-register permute picks `low[i]`, 16 + i picks `high[i]`.
            unsafe {
                let low = _mm512_loadu_ps(pairs.as_ptr());
                let high = _mm512_loadu_ps(pairs.as_ptr().add(16));
                let evens =
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let odds =
                    _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
                _mm512_storeu_ps(even.as_mut_ptr(), _mm512_permutex2var_ps(low, evens, high));
                _mm512_storeu_ps(odd.as_mut_ptr(), _mm512_permutex2var_ps(low, odds, high));
            }
        }

        #[inline(always)]
        fn block_3x3(self, rows: &[f32], stride: usize) -> Option<__m512> {
            let rows = &rows[..2 * stride + 3];
            // SAFETY: the token proves AVX-512F and AVX-512VL. Each masked load reads only
            // the three values of its row, `rows[r * stride..][..3]`, within `rows`.
            unsafe {
                let start = rows.as_ptr();
                let top = _mm_maskz_loadu_ps(0b0111, start);
                let middle = _mm_maskz_loadu_ps(0b0111, start.add(stride));
                // The 1 of lane 11 (BLOCK_3X3_ONE) rides in the bottom row's unused fourth lane.
                let one = _mm_setr_ps(0.0, 0.0, 0.0, 1.0);
                let bottom = _mm_mask_loadu_ps(one, 0b0111, start.add(2 * stride));
                let block = _mm512_insertf32x4::<1>(_mm512_zextps128_ps512(top), middle);
                Some(_mm512_insertf32x4::<2>(block, bottom))
            }
        }

        #[inline(always)]
        fn block_5x5(self, rows: &[f32], stride: usize) -> Option<[__m512; 2]> {
            if stride < 5 {
                return None;
            }
            let rows = &rows[..4 * stride + 5];
            // SAFETY: the token proves AVX-512F. Each masked load reads only the lanes its
            // mask sets: the values of row r, `rows[r * stride..][..5]` (or part of them),
            // within `rows`. Its lane 0 may lie before them (row r into lanes from 5r on), but
            // not before `rows`, as the stride is at least 5, and unset lanes are not read.
            unsafe {
                let start = rows.as_ptr();
                let row = |r: usize, from_lane: usize| start.add(r * stride).sub(from_lane);
                let low = _mm512_maskz_loadu_ps(0x001F, start);
                let low = _mm512_mask_loadu_ps(low, 0x03E0, row(1, 5));
                let low = _mm512_mask_loadu_ps(low, 0x7C00, row(2, 10));
                // Row 3 straddles the registers: its first value is lane 15 of the first.
                let low = _mm512_mask_loadu_ps(low, 0x8000, row(3, 15));
                let one =
                    _mm512_maskz_mov_ps(1 << (super::BLOCK_5X5_ONE - 16), _mm512_set1_ps(1.0));
                let high = _mm512_mask_loadu_ps(one, 0x000F, row(3, 0).add(1));
                let high = _mm512_mask_loadu_ps(high, 0x01F0, row(4, 4));
                Some([low, high])
            }
        }

        #[inline(always)]
        fn maxima_in_pixel_order(
            self,
            dy: &[f32],
            argmax: &[u32],
            grid: MaximaGrid,
            out: MaximaOut<'_>,
        ) -> Option<usize> {
            let MaximaGrid {
                pool_w,
                out_w,
                padded_w,
            } = grid;
            let windows = argmax.len().min(dy.len()) / pool_w * pool_w;
            let room = windows + 16;
            let (pixels, starts) = (&mut out.pixels[..room], &mut out.starts[..room]);
            let grads = &mut out.grads[..room];
            let (mut count, mut stray) = (0, 0);
            // SAFETY: the token proves AVX-512F. Each masked load reads only the windows of
            // its chunk, within `dy` and `argmax`; each store writes [count..count + 16] of
            // an output, within it, as count is at most the windows taken before (a window's
            // two rows exclude each other, `out_w` being at least 2). (No closure, as in
            // `nonzero_positions`.)
            unsafe {
                let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                let (two, width) = (_mm512_set1_epi32(2), _mm512_set1_epi32(out_w as i32));
                let none = _mm512_set1_epi32(NO_GRADIENT as i32);
                let rows = dy[..windows]
                    .chunks_exact(pool_w)
                    .zip(argmax[..windows].chunks_exact(pool_w));
                for (i, (dy, argmax)) in rows.enumerate() {
                    for bottom in [false, true] {
                        let row = 2 * i + usize::from(bottom);
                        let shift = _mm512_set1_epi32((row * (padded_w - out_w)) as i32);
                        for (c, (dy, argmax)) in dy.chunks(16).zip(argmax.chunks(16)).enumerate() {
                            let lanes = (u32::MAX >> (32 - argmax.len())) as __mmask16;
                            let at = _mm512_maskz_loadu_epi32(lanes, argmax.as_ptr().cast());
                            let g = _mm512_maskz_loadu_epi32(lanes, dy.as_ptr().cast());
                            // Window j's top left pixel is (2i, 2j).
                            let top_left = _mm512_set1_epi32((2 * i * out_w + 32 * c) as i32);
                            let corner = _mm512_add_epi32(top_left, _mm512_add_epi32(lane, lane));
                            let from_corner = _mm512_sub_epi32(at, corner);
                            let below = _mm512_sub_epi32(from_corner, width);
                            let in_top = _mm512_mask_cmplt_epu32_mask(lanes, from_corner, two);
                            let in_bottom = _mm512_mask_cmplt_epu32_mask(lanes, below, two);
                            if !bottom {
                                let live = _mm512_mask_cmpneq_epi32_mask(lanes, at, none);
                                stray |= live & !(in_top | in_bottom);
                            }
                            let here = if bottom { in_bottom } else { in_top };
                            let start = _mm512_add_epi32(at, shift);
                            for (out, v) in
                                [(&mut *pixels, at), (&mut *starts, start), (&mut *grads, g)]
                            {
                                let to = out.as_mut_ptr().add(count).cast::<__m512i>();
                                _mm512_storeu_si512(to, _mm512_maskz_compress_epi32(here, v));
                            }
                            count += here.count_ones() as usize;
                        }
                    }
                }
            }
            (stray == 0).then_some(count)
        }

        #[inline(always)]
        fn nonzero_positions(self, values: &[f32], out: &mut [u32]) -> usize {
            // Sixteen values a compare and a compress (the scalar loop, a compare and a store
            // per value, was a fifth of the sparse backward pass of fast-cnn's second layer).
            let out = &mut out[..values.len() + 16];
            let mut count = 0;
            // SAFETY: the token proves AVX-512F. Each masked load reads only the values of its
            // chunk; each store writes out[count..count + 16], within `out`, as count is at
            // most the number of values before the chunk. (No closure: one is compiled
            // without the target's features when not inlined, which LLVM could not lower.)
            unsafe {
                let zero = _mm512_setzero_ps();
                let mut positions =
                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                for chunk in values.chunks(16) {
                    let lanes = (u32::MAX >> (32 - chunk.len())) as __mmask16;
                    let v = _mm512_maskz_loadu_ps(lanes, chunk.as_ptr());
                    let nonzero = _mm512_mask_cmp_ps_mask::<_CMP_NEQ_UQ>(lanes, v, zero);
                    let at = out.as_mut_ptr().add(count).cast::<__m512i>();
                    _mm512_storeu_si512(at, _mm512_maskz_compress_epi32(nonzero, positions));
                    count += nonzero.count_ones() as usize;
                    positions = _mm512_add_epi32(positions, _mm512_set1_epi32(16));
                }
            }
            count
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lanes with mixed signs and magnitudes, so that a different order of additions rounds
    /// differently.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(7);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let mantissa = (s % 20001) as f32 / 1000.0 - 10.0;
                mantissa * [1e-3f32, 1.0, 1e3][(s >> 20) as usize % 3]
            })
            .collect()
    }

    /// Every operation of `simd` against the same arithmetic on scalars, bit for bit.
    fn check<S: Simd>(simd: S, fused: bool) {
        let lanes = S::LANES;
        for seed in 0..200 {
            let (a, b, c) = (
                values(lanes, seed),
                values(lanes, seed + 1000),
                values(lanes, 7),
            );
            let mut out = vec![0.0f32; lanes + 1];
            let product = simd.mul_add(simd.load(&a), simd.load(&b), simd.load(&c));
            simd.store(product, &mut out);
            for l in 0..lanes {
                let want = if fused {
                    a[l].mul_add(b[l], c[l])
                } else {
                    a[l] * b[l] + c[l]
                };
                assert_eq!(out[l].to_bits(), want.to_bits(), "mul_add lane {l}");
            }
            assert_eq!(out[lanes], 0.0, "store wrote past its register");
            simd.store(simd.add(simd.load(&a), simd.splat(c[0])), &mut out);
            for l in 0..lanes {
                assert_eq!(out[l].to_bits(), (a[l] + c[0]).to_bits(), "add lane {l}");
            }
            let mut halves = a.clone();
            let mut n = lanes;
            while n > 1 {
                n /= 2;
                for i in 0..n {
                    halves[i] += halves[i + n];
                }
            }
            assert_eq!(
                simd.sum(simd.load(&a)).to_bits(),
                halves[0].to_bits(),
                "sum"
            );
        }
        // A block inside wider rows, into wider rows: every value lands transposed, and
        // nothing outside the block is written.
        let (src_stride, dst_stride) = (11, 13);
        let src = values(7 * src_stride + 8, 3);
        let mut dst = vec![f32::NAN; 8 * dst_stride];
        simd.transpose_8x8(&src, src_stride, &mut dst, dst_stride);
        for (i, &v) in dst.iter().enumerate() {
            let (c, r) = (i / dst_stride, i % dst_stride);
            if r < 8 {
                assert_eq!(v.to_bits(), src[r * src_stride + c].to_bits(), "({r}, {c})");
            } else {
                assert!(v.is_nan(), "wrote past the block at {i}");
            }
        }
        // Pairs inside a longer row: each value to its half, nothing written past a register.
        let row = values(2 * lanes + 3, 5);
        let (mut even, mut odd) = (vec![f32::NAN; lanes + 1], vec![f32::NAN; lanes + 1]);
        simd.deinterleave(&row[1..], &mut even, &mut odd);
        for l in 0..lanes {
            assert_eq!(even[l].to_bits(), row[1 + 2 * l].to_bits(), "even lane {l}");
            assert_eq!(odd[l].to_bits(), row[2 + 2 * l].to_bits(), "odd lane {l}");
        }
        assert!(
            even[lanes].is_nan() && odd[lanes].is_nan(),
            "wrote past a register"
        );
        // Nonzero positions of rows of every length up to three registers and a bit, with
        // zeros, -0.0 and NaN among them: the same positions as a scalar filter.
        for len in 0..3 * lanes + 3 {
            let row: Vec<f32> = values(len, len as u32)
                .iter()
                .enumerate()
                .map(|(i, &v)| match i % 5 {
                    0 => 0.0,
                    1 if i % 3 == 0 => -0.0,
                    2 if i % 7 == 2 => f32::NAN,
                    _ => v,
                })
                .collect();
            let expected: Vec<u32> = (0..)
                .zip(&row)
                .filter(|&(_, &v)| v != 0.0)
                .map(|(p, _)| p)
                .collect();
            let mut out = vec![u32::MAX; len + lanes + 1];
            let count = simd.nonzero_positions(&row, &mut out);
            assert_eq!(&out[..count], &expected[..], "positions of {len} values");
            assert_eq!(
                out[len + lanes],
                u32::MAX,
                "wrote past the room of {len} values"
            );
        }
    }

    /// [`Simd::block_3x3`], where `simd` has it, against the rows it reads.
    fn check_block_3x3<S: Simd>(simd: S) {
        let stride = 7;
        let rows = values(2 * stride + 3 + 5, 9);
        let Some(block) = simd.block_3x3(&rows[4..], stride) else {
            return;
        };
        let mut lanes = vec![f32::NAN; S::LANES];
        simd.store(block, &mut lanes);
        for (lane, &v) in lanes.iter().enumerate() {
            let (r, c) = (lane / 4, lane % 4);
            let want = match lane {
                BLOCK_3X3_ONE => 1.0,
                _ if r < 3 && c < 3 => rows[4 + r * stride + c],
                _ => 0.0,
            };
            assert_eq!(v.to_bits(), want.to_bits(), "block lane {lane}");
        }
    }

    /// [`Simd::block_5x5`], where `simd` has it, against the rows it reads, for the narrowest
    /// stride and a wider one.
    fn check_block_5x5<S: Simd>(simd: S) {
        for stride in [5, 9] {
            let rows = values(4 * stride + 5 + 8, 11);
            assert!(simd.block_5x5(&rows[3..], 4).is_none(), "stride 4");
            let Some(block) = simd.block_5x5(&rows[3..], stride) else {
                return;
            };
            let mut lanes = vec![f32::NAN; 2 * S::LANES];
            simd.store(block[0], &mut lanes);
            simd.store(block[1], &mut lanes[S::LANES..]);
            for (lane, &v) in lanes.iter().enumerate() {
                let want = match lane {
                    BLOCK_5X5_ONE => 1.0,
                    _ if lane < 25 => rows[3 + lane / 5 * stride + lane % 5],
                    _ => 0.0,
                };
                assert_eq!(
                    v.to_bits(),
                    want.to_bits(),
                    "stride {stride}, block lane {lane}"
                );
            }
        }
    }

    /// [`Simd::maxima_in_pixel_order`] against sorting: planes of 2x2 windows up to three
    /// registers of windows wide, odd and even widths, padded or not, some windows passing no
    /// gradient, and in some planes a maximum outside its window (None).
    fn check_maxima_in_pixel_order<S: Simd>(simd: S) {
        for case in 0..160usize {
            let (pool_w, pool_h) = (1 + case % 37, 1 + case % 4);
            let out_w = 2 * pool_w + (case / 4) % 2;
            let padded_w = out_w + 2 * ((case / 8) % 2);
            let windows = pool_w * pool_h;
            let dy = values(windows, case as u32);
            let mut state = (case as u32).wrapping_mul(2654435761) | 1;
            let mut argmax: Vec<u32> = (0..windows)
                .map(|window| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    let (i, j) = (window / pool_w, window % pool_w);
                    let (r, c) = (
                        2 * i + (state >> 3) as usize % 2,
                        2 * j + (state >> 4) as usize % 2,
                    );
                    if state.is_multiple_of(5) {
                        NO_GRADIENT
                    } else {
                        (r * out_w + c) as u32
                    }
                })
                .collect();
            if case % 3 == 0 && windows > 1 {
                // Window 0's maximum in the last window's bottom right pixel.
                argmax[0] = ((2 * pool_h - 1) * out_w + 2 * pool_w - 1) as u32;
            }
            let own = |window: usize, at: u32| {
                let (r, c) = (at as usize / out_w, at as usize % out_w);
                (r / 2, c / 2) == (window / pool_w, window % pool_w) && c < 2 * pool_w
            };
            let mut live: Vec<(u32, usize)> = (0..windows)
                .filter(|&w| argmax[w] != NO_GRADIENT)
                .map(|w| (argmax[w], w))
                .collect();
            live.sort();
            let owned = live.iter().all(|&(at, w)| own(w, at));
            let room = windows + S::LANES.max(16) + 1;
            let (mut pixels, mut starts, mut grads) = (
                vec![u32::MAX; room],
                vec![u32::MAX; room],
                vec![u32::MAX; room],
            );
            let grid = MaximaGrid {
                pool_w,
                out_w,
                padded_w,
            };
            let out = MaximaOut {
                pixels: &mut pixels,
                starts: &mut starts,
                grads: &mut grads,
            };
            let count = simd.maxima_in_pixel_order(&dy, &argmax, grid, out);
            assert_eq!(count, owned.then_some(live.len()), "case {case}");
            for (k, &(at, w)) in live.iter().enumerate().take(count.unwrap_or(0)) {
                let start = at as usize / out_w * padded_w + at as usize % out_w;
                assert_eq!(
                    (pixels[k], starts[k] as usize),
                    (at, start),
                    "case {case}, {k}"
                );
                assert_eq!(grads[k], dy[w].to_bits(), "case {case}, {k}");
            }
            assert_eq!(
                pixels[room - 1],
                u32::MAX,
                "case {case}: wrote past the room"
            );
        }
    }

    #[test]
    fn portable_lanes_compute_what_scalars_do() {
        check(Portable, false);
        check_maxima_in_pixel_order(Portable);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_lanes_compute_what_scalars_do() {
        // Whatever this CPU has; CI runs the suite again with TENSOR_ISA capping it.
        if let Some(simd) = Avx512::detected() {
            check(simd, true);
            check_block_3x3(simd);
            check_block_5x5(simd);
            check_maxima_in_pixel_order(simd);
        }
        if let Some(simd) = Avx2::detected() {
            check(simd, true);
            check_maxima_in_pixel_order(simd);
        }
    }
}
