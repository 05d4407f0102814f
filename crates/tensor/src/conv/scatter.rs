//! The backward pass over only the nonzero entries of a sparse output gradient, for
//! convolutions computed by im2col + GEMM.
//!
//! Why: behind ReLU and max pooling, at most one pixel in each pooling window gets a gradient
//! (a quarter or less for 2x2 windows, a fifth for conv 32->64 on 11x11), but the dense GEMMs
//! multiply every zero. Here each nonzero `g = dy[o, oh, ow]` adds `g * W[o]` onto the input
//! gradient around it and `g * x` (its receptive field) onto `dW[o]`.
//!
//! Both are long contiguous runs when images and weights are channels last: kernel row kh of
//! a receptive field is KW neighbouring pixels of C channels each, `KW*C` consecutive values
//! of a zero-padded `[HP, WP, C]` image, and `W[o, kh]` is the same run in `[O, KH, KW, C]`.

use ndarray::{ArrayView2, ArrayViewMut3};

use super::layout::{from_channels_last, image_len};
use super::{Conv2dDims, into_contiguous};
use crate::simd::{MulAdd, dispatched};
use crate::vector::Simd;

/// Whether scattering `grad` beats the dense GEMMs, given `bound`, the most nonzeros it can
/// have when known (a pooled gradient's). Where the bound already pays, the nonzeros are not
/// counted: the count is a pass over the whole gradient (2% of a fast-cnn step) that could
/// not change the choice.
pub(crate) fn pays(grad: &ArrayView2<'_, f32>, bound: Option<usize>) -> bool {
    let pays = |nonzeros| pays_with(nonzeros, grad.len());
    bound.is_some_and(pays) || pays(nonzeros(grad))
}

/// Whether scattering beats the dense GEMMs for an output gradient with `nonzeros` of `len`
/// entries: the scatter does `nonzeros / len` of the GEMMs' multiply-adds at about half their
/// speed (measured on conv 32->64), so up to 30% nonzeros it wins.
fn pays_with(nonzeros: usize, len: usize) -> bool {
    nonzeros * 10 <= len * 3
}

dispatched! {
    /// The nonzero entries of `grad` (a NaN is nonzero, -0.0 is not).
    fn nonzeros(grad: &ArrayView2<'_, f32>) -> usize => nonzeros_body;
}

#[inline(always)]
fn nonzeros_body<S: Simd, const LANES: usize>(_simd: S, grad: &ArrayView2<'_, f32>) -> usize {
    grad.rows()
        .into_iter()
        .map(|row| match row.as_slice() {
            Some(row) => count_nonzero::<LANES>(row),
            None => row.iter().filter(|&&v| v != 0.0).count(),
        })
        .sum()
}

/// The nonzero values of `values`, counted in 32-bit lanes: summed as `usize` (as the pass
/// deciding between scatter and GEMMs did), the compiler widened every comparison to 64 bits
/// in baseline SSE2, and the count took 5% of a fast-cnn training step.
#[inline(always)]
fn count_nonzero<const LANES: usize>(values: &[f32]) -> usize {
    // Blocks short enough that no lane's count can overflow.
    const BLOCK_VECTORS: usize = 1 << 24;
    let mut total = 0;
    for block in values.chunks(BLOCK_VECTORS * LANES) {
        let mut counts = [0u32; LANES];
        let chunks = block.chunks_exact(LANES);
        total += chunks.remainder().iter().filter(|&&v| v != 0.0).count();
        for chunk in chunks {
            for (count, &v) in counts.iter_mut().zip(chunk) {
                *count += u32::from(v != 0.0);
            }
        }
        total += counts.iter().map(|&c| c as usize).sum::<usize>();
    }
    total
}

/// One chunk's share of the scatter path: its images channels last, kept by the forward pass,
/// and its scratch.
pub(crate) struct ChunkScatter<'a> {
    /// The chunk's images, each `image_len` values.
    pub(crate) images: &'a [f32],
    /// `[O, KH*KW*C]`: the chunk's weight-gradient sum, channels last.
    pub(crate) dw: &'a mut [f32],
    /// One image's input gradient, channels last (empty when none is wanted).
    pub(crate) dx: &'a mut [f32],
    /// `OH*OW` values of scratch for the nonzero gradients' receptive-field corners.
    pub(crate) corners: &'a mut [usize],
    /// `OH*OW` values of scratch for one channel's nonzero gradients.
    pub(crate) values: &'a mut [f32],
    /// [`lists_len`] values of scratch for where the nonzero gradients are.
    pub(crate) lists: &'a mut [u32],
}

/// The scratch [`ChunkScatter::lists`] holds: the nonzeros of one output channel (and room
/// for a register stored past them, see [`Simd::nonzero_positions`]), and each pixel's
/// [`mask_words`].
pub(crate) fn lists_len(dims: &Conv2dDims) -> usize {
    let pixels = dims.out_pixels();
    pixels + LIST_SLACK + pixels * mask_words(dims)
}

/// The words of a pixel's mask of the output channels with a nonzero gradient there (bit
/// `o % 32` of word `o / 32` for channel o).
fn mask_words(dims: &Conv2dDims) -> usize {
    dims.out_channels.div_ceil(32)
}

/// Room past the nonzero lists for one register of the widest instruction set.
const LIST_SLACK: usize = 16;

impl ChunkScatter<'_> {
    /// Scatters image j's output gradient `grad [O, OH*OW]`: onto the chunk's weight gradient,
    /// and into `dx [C, H, W]` (overwritten) when given.
    pub(crate) fn image(
        &mut self,
        dims: &Conv2dDims,
        weight_cl: &[f32],
        j: usize,
        grad: ArrayView2<'_, f32>,
        dx: Option<ArrayViewMut3<'_, f32>>,
    ) {
        let len = image_len(dims);
        let x = &self.images[j * len..(j + 1) * len];
        let dx_cl = dx.is_some().then(|| {
            let dx_cl = &mut self.dx[..len];
            dx_cl.fill(0.0);
            dx_cl
        });
        let scratch = (&mut *self.corners, &mut *self.values, &mut *self.lists);
        scatter_image(dims, grad, x, weight_cl, self.dw, dx_cl, scratch);
        if let Some(dx) = dx {
            from_channels_last(dims, self.dx, dx);
        }
    }
}

dispatched! {
    /// For every nonzero `g = grad[o, p]` (`grad [O, OH*OW]`) of one image: `dw_cl[o] += g *` the
    /// receptive field of p in `x_cl`, and, when given, `dx_cl +=` `g * weight_cl[o]` over that
    /// receptive field. `x_cl` and `dx_cl` are padded channels-last images; `weight_cl` and
    /// `dw_cl` are `[O, KH, KW, C]`.
    fn scatter_image(
        dims: &Conv2dDims,
        grad: ArrayView2<'_, f32>,
        x_cl: &[f32],
        weight_cl: &[f32],
        dw_cl: &mut [f32],
        dx_cl: Option<&mut [f32]>,
        scratch: (&mut [usize], &mut [f32], &mut [u32]),
    ) => scatter_image_body;
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scatter_image_body<S: Simd, const LANES: usize>(
    simd: S,
    dims: &Conv2dDims,
    grad: ArrayView2<'_, f32>,
    x_cl: &[f32],
    weight_cl: &[f32],
    dw_cl: &mut [f32],
    mut dx_cl: Option<&mut [f32]>,
    (corners, values, lists): (&mut [usize], &mut [f32], &mut [u32]),
) {
    let patch = dims.patch_len();
    let run = dims.kernel_w * dims.in_channels;
    if run >= LANES {
        let scratch = (corners, lists);
        scatter_by_lists::<S, LANES>(simd, dims, grad, x_cl, weight_cl, dw_cl, dx_cl, scratch);
        return;
    }
    let row_len = dims.padded_w() * dims.in_channels;
    let ow_count = dims.out_w();
    let step_w = dims.stride_w * dims.in_channels;
    let step_h = dims.stride_h * row_len;
    for ((row, dw), w) in grad
        .outer_iter()
        .zip(dw_cl.chunks_exact_mut(patch))
        .zip(weight_cl.chunks_exact(patch))
    {
        // First the nonzeros and their receptive fields' top-left corners, without a branch
        // (which would be mispredicted at random on a pooled gradient): every entry is written,
        // only nonzeros advance the count.
        let mut count = 0;
        let (mut corner, mut row_start, mut ow) = (0, 0, 0);
        for &g in row.iter() {
            corners[count] = corner;
            values[count] = g;
            count += usize::from(g != 0.0);
            ow += 1;
            corner += step_w;
            if ow == ow_count {
                (ow, row_start) = (0, row_start + step_h);
                corner = row_start;
            }
        }
        let (corners, values) = (&corners[..count], &values[..count]);
        for (&corner, &g) in corners.iter().zip(values) {
            for ((dw, w), kh) in dw.chunks_exact_mut(run).zip(w.chunks_exact(run)).zip(0..) {
                let at = corner + kh * row_len;
                axpy::<S::MulAdd, LANES>(g, &x_cl[at..at + run], dw);
                if let Some(dx) = dx_cl.as_mut() {
                    axpy::<S::MulAdd, LANES>(g, w, &mut dx[at..at + run]);
                }
            }
        }
    }
}

/// [`scatter_image_body`] for kernel rows of at least one vector (`KW*C` at least LANES: C =
/// 32's 96 values, or LeNet-5's 5 x 6 = 30), summing in registers instead of scattering each
/// product onto memory (which loads two operands and stores one per multiply-add, and
/// measured 140 cycles a nonzero on conv 32->64):
/// - `dW[o] += g * x` over the nonzeros of channel o, strip by strip of the kernel rows, each
///   strip's sums in registers across all of them;
/// - the input gradient by output pixel: the `g * W[o]` of all the channels with a nonzero
///   at pixel p summed in registers, then added once onto the receptive field of p.
///
/// The nonzeros are listed per channel (by a scan without branches) and marked in a bit mask
/// per pixel, whose set bits are the pixel's channels in order; every sum runs in an order
/// fixed by the gradient's values alone.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scatter_by_lists<S: Simd, const LANES: usize>(
    simd: S,
    dims: &Conv2dDims,
    grad: ArrayView2<'_, f32>,
    x_cl: &[f32],
    weight_cl: &[f32],
    dw_cl: &mut [f32],
    dx_cl: Option<&mut [f32]>,
    (corners, lists): (&mut [usize], &mut [u32]),
) {
    let (pixels, patch) = (dims.out_pixels(), dims.patch_len());
    let run = dims.kernel_w * dims.in_channels;
    let row_len = dims.padded_w() * dims.in_channels;
    let corners = &mut corners[..pixels];
    let (step_w, step_h) = (dims.stride_w * dims.in_channels, dims.stride_h * row_len);
    for (oh, corners) in corners.chunks_exact_mut(dims.out_w()).enumerate() {
        for (ow, corner) in corners.iter_mut().enumerate() {
            *corner = oh * step_h + ow * step_w;
        }
    }
    let corners = &*corners;
    let words = mask_words(dims);
    let (nonzeros, masks) = lists.split_at_mut(pixels + LIST_SLACK);
    let masks = &mut masks[..pixels * words];
    masks.fill(0);
    for ((o, row), dw) in grad
        .outer_iter()
        .enumerate()
        .zip(dw_cl.chunks_exact_mut(patch))
    {
        let row = into_contiguous(row);
        let count = simd.nonzero_positions(row, nonzeros);
        let nonzeros = &nonzeros[..count];
        let (word, bit) = (o / 32, 1 << (o % 32));
        for &p in nonzeros {
            masks[p as usize * words + word] |= bit;
        }
        let fields = nonzeros
            .iter()
            .map(|&p| (row[p as usize], corners[p as usize]));
        let rows = KernelRows {
            count: dims.kernel_h,
            run,
            source_stride: row_len,
            out_stride: run,
        };
        add_kernel_rows::<S::MulAdd, LANES>(fields, x_cl, dw, rows, true);
    }
    let Some(dx_cl) = dx_cl else {
        return;
    };
    let rows = KernelRows {
        count: dims.kernel_h,
        run,
        source_stride: run,
        out_stride: row_len,
    };
    for (p, (&corner, mask)) in corners.iter().zip(masks.chunks_exact(words)).enumerate() {
        if mask.iter().all(|&word| word == 0) {
            continue;
        }
        let weights = SetBits::new(mask).map(|o| (grad[[o, p]], o * patch));
        add_kernel_rows::<S::MulAdd, LANES>(weights, weight_cl, &mut dx_cl[corner..], rows, false);
    }
}

/// The indices of the set bits of a mask of 32-bit words, in increasing order.
#[derive(Clone)]
struct SetBits<'a> {
    /// The words after the current one.
    rest: &'a [u32],
    /// The current word's bits not yet returned.
    bits: u32,
    /// The index of the current word's bit 0.
    base: usize,
}

impl<'a> SetBits<'a> {
    /// The set bits of `words`, bit b of word w being index `32 * w + b`.
    fn new(words: &'a [u32]) -> Self {
        match words.split_first() {
            Some((&bits, rest)) => SetBits {
                rest,
                bits,
                base: 0,
            },
            None => SetBits {
                rest: words,
                bits: 0,
                base: 0,
            },
        }
    }
}

impl Iterator for SetBits<'_> {
    type Item = usize;

    #[inline(always)]
    fn next(&mut self) -> Option<usize> {
        while self.bits == 0 {
            let (&bits, rest) = self.rest.split_first()?;
            (self.bits, self.rest, self.base) = (bits, rest, self.base + 32);
        }
        let bit = self.bits.trailing_zeros() as usize;
        self.bits &= self.bits - 1;
        Some(self.base + bit)
    }
}

/// The kernel rows one term of [`add_kernel_rows`] covers: `count` runs of `run` values,
/// `source_stride` apart in the source and `out_stride` apart in the output.
#[derive(Clone, Copy)]
struct KernelRows {
    count: usize,
    run: usize,
    source_stride: usize,
    out_stride: usize,
}

/// For each kernel row r: `out[r * out_stride..][..run] += sum_i g_i *
/// source[at_i + r * source_stride..][..run]` over `(g_i, at_i)`, `run` at least one vector
/// long. The three rows of a 3x3 kernel are summed in one pass over the terms (a pass per
/// row walked the list three times, and C = 16's three-vector rows took two passes each:
/// the list's index arithmetic outweighed the multiply-adds).
#[inline(always)]
fn add_kernel_rows<M: MulAdd, const LANES: usize>(
    terms: impl Iterator<Item = (f32, usize)> + Clone,
    source: &[f32],
    out: &mut [f32],
    rows: KernelRows,
    from_out: bool,
) {
    if rows.count == 3 {
        add_in_strips::<M, LANES, 3>(terms, source, out, rows, from_out);
        return;
    }
    for r in 0..rows.count {
        let terms = terms
            .clone()
            .map(move |(g, at)| (g, at + r * rows.source_stride));
        add_in_strips::<M, LANES, 1>(
            terms,
            source,
            &mut out[r * rows.out_stride..],
            rows,
            from_out,
        );
    }
}

/// [`add_kernel_rows`] for R rows at once (`rows.count` is R, or 1 and R = 1): strips of up
/// to 6 vectors of each row whose sums stay in registers (fewer for R = 3, so that they fit
/// in 32 registers with AVX-512's 16 lanes, 16 with 8), in two sets (even and odd i, added
/// at the end) so that 8 or more multiply-adds are in flight. The sums start from `out` when
/// `from_out` (the weight gradient, summed over many nonzeros), else from zero and are then
/// added onto `out` (a pixel's share of the input gradient). Each value's sum runs in the
/// same order whatever R and the strip widths are.
///
/// A run that is not whole vectors (`KW*C` = 30 for LeNet-5's 5x5 kernel over 6 channels)
/// ends with a strip of its last whole vector and the vector that ends the run, which
/// overlap: their common lanes are the same sums in the same order, so either store writes
/// the same values. The run must be at least one vector long.
#[inline(always)]
fn add_in_strips<M: MulAdd, const LANES: usize, const R: usize>(
    terms: impl Iterator<Item = (f32, usize)> + Clone,
    source: &[f32],
    out: &mut [f32],
    rows: KernelRows,
    from_out: bool,
) {
    debug_assert!(rows.run >= LANES);
    let whole = if rows.run.is_multiple_of(LANES) {
        rows.run
    } else {
        (rows.run / LANES - 1) * LANES
    };
    let done = if R == 1 {
        let done = strips::<M, LANES, 6, R>(terms.clone(), source, out, rows, 0, whole, from_out);
        strips::<M, LANES, 4, R>(terms.clone(), source, out, rows, done, whole, from_out)
    } else if LANES >= 16 {
        let done = strips::<M, LANES, 4, R>(terms.clone(), source, out, rows, 0, whole, from_out);
        strips::<M, LANES, 3, R>(terms.clone(), source, out, rows, done, whole, from_out)
    } else {
        0
    };
    let done = strips::<M, LANES, 2, R>(terms.clone(), source, out, rows, done, whole, from_out);
    let done = strips::<M, LANES, 1, R>(terms.clone(), source, out, rows, done, whole, from_out);
    debug_assert_eq!(done, whole);
    if whole < rows.run {
        overlapping_tail::<M, LANES, R>(terms, source, out, rows, whole, from_out);
    }
}

/// The whole strips of `V` vectors of each of R rows from `start` to at most `end` for
/// [`add_in_strips`]; returns where they end.
#[inline(always)]
fn strips<M: MulAdd, const LANES: usize, const V: usize, const R: usize>(
    terms: impl Iterator<Item = (f32, usize)> + Clone,
    source: &[f32],
    out: &mut [f32],
    rows: KernelRows,
    start: usize,
    end: usize,
    from_out: bool,
) -> usize {
    let mut start = start;
    while start + V * LANES <= end {
        let mut even = [[[0.0f32; LANES]; V]; R];
        let mut odd = [[[0.0f32; LANES]; V]; R];
        if from_out {
            for (r, even) in even.iter_mut().enumerate() {
                let strip = &out[r * rows.out_stride + start..][..V * LANES];
                for (acc, strip) in even.iter_mut().zip(strip.chunks_exact(LANES)) {
                    acc.copy_from_slice(strip);
                }
            }
        }
        let mut terms = terms.clone();
        while let Some((g, at)) = terms.next() {
            add_term::<M, LANES, V, R>(&mut even, g, &source[at + start..], rows);
            let Some((g, at)) = terms.next() else {
                break;
            };
            add_term::<M, LANES, V, R>(&mut odd, g, &source[at + start..], rows);
        }
        for (r, (even, odd)) in even.iter().zip(&odd).enumerate() {
            let strip = &mut out[r * rows.out_stride + start..][..V * LANES];
            for ((strip, even), odd) in strip.chunks_exact_mut(LANES).zip(even).zip(odd) {
                for ((s, &e), &o) in strip.iter_mut().zip(even).zip(odd) {
                    *s = if from_out { e + o } else { *s + (e + o) };
                }
            }
        }
        start += V * LANES;
    }
    start
}

/// `sums[r] += g * x[r * rows.source_stride..][..V * LANES]` for each of the R rows. (A
/// function, not a closure: a closure was not inlined into the SIMD-compiled caller and
/// called `fmaf` per value.)
#[inline(always)]
fn add_term<M: MulAdd, const LANES: usize, const V: usize, const R: usize>(
    sums: &mut [[[f32; LANES]; V]; R],
    g: f32,
    x: &[f32],
    rows: KernelRows,
) {
    for (r, sums) in sums.iter_mut().enumerate() {
        let x = &x[r * rows.source_stride..][..V * LANES];
        for (acc, x) in sums.iter_mut().zip(x.chunks_exact(LANES)) {
            for (a, &x) in acc.iter_mut().zip(x) {
                *a = M::mul_add(g, x, *a);
            }
        }
    }
}

/// The end of a run that is not whole vectors, for [`add_in_strips`]: in each of R rows,
/// the last whole vector (at `whole`) and the vector that ends the run, which overlap. Both
/// are summed before either is stored, so their common lanes, the same sums in the same
/// order, are stored twice with the same values.
#[inline(always)]
fn overlapping_tail<M: MulAdd, const LANES: usize, const R: usize>(
    mut terms: impl Iterator<Item = (f32, usize)>,
    source: &[f32],
    out: &mut [f32],
    rows: KernelRows,
    whole: usize,
    from_out: bool,
) {
    let offsets = [whole, rows.run - LANES];
    let vector = |r: usize, v: usize| &out[r * rows.out_stride + offsets[v]..][..LANES];
    let mut even = [[[0.0f32; LANES]; 2]; R];
    let mut odd = [[[0.0f32; LANES]; 2]; R];
    if from_out {
        for (r, even) in even.iter_mut().enumerate() {
            for (v, acc) in even.iter_mut().enumerate() {
                acc.copy_from_slice(vector(r, v));
            }
        }
    }
    while let Some((g, at)) = terms.next() {
        add_tail_term::<M, LANES, R>(&mut even, g, &source[at..], rows, offsets);
        let Some((g, at)) = terms.next() else {
            break;
        };
        add_tail_term::<M, LANES, R>(&mut odd, g, &source[at..], rows, offsets);
    }
    let mut sums = [[[0.0f32; LANES]; 2]; R];
    for (r, ((sums, even), odd)) in sums.iter_mut().zip(&even).zip(&odd).enumerate() {
        for (v, ((sums, even), odd)) in sums.iter_mut().zip(even).zip(odd).enumerate() {
            let before = vector(r, v);
            for (((s, &e), &o), &b) in sums.iter_mut().zip(even).zip(odd).zip(before) {
                *s = if from_out { e + o } else { b + (e + o) };
            }
        }
    }
    for (r, sums) in sums.iter().enumerate() {
        for (v, sums) in sums.iter().enumerate() {
            out[r * rows.out_stride + offsets[v]..][..LANES].copy_from_slice(sums);
        }
    }
}

/// [`add_term`] for [`overlapping_tail`]'s two vectors of each row, at `offsets`.
#[inline(always)]
fn add_tail_term<M: MulAdd, const LANES: usize, const R: usize>(
    sums: &mut [[[f32; LANES]; 2]; R],
    g: f32,
    x: &[f32],
    rows: KernelRows,
    offsets: [usize; 2],
) {
    for (r, sums) in sums.iter_mut().enumerate() {
        for (acc, &offset) in sums.iter_mut().zip(&offsets) {
            let x = &x[r * rows.source_stride + offset..][..LANES];
            for (a, &x) in acc.iter_mut().zip(x) {
                *a = M::mul_add(g, x, *a);
            }
        }
    }
}

/// `y += a * x` one whole vector at a time (a fixed-length inner loop, so each is one
/// instruction), then the tail.
#[inline(always)]
fn axpy<M: MulAdd, const LANES: usize>(a: f32, x: &[f32], y: &mut [f32]) {
    let (mut xs, mut ys) = (x.chunks_exact(LANES), y.chunks_exact_mut(LANES));
    for (x, y) in (&mut xs).zip(&mut ys) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = M::mul_add(a, x, *y);
        }
    }
    for (y, &x) in ys.into_remainder().iter_mut().zip(xs.remainder()) {
        *y = M::mul_add(a, x, *y);
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::{SetBits, nonzeros};

    #[test]
    fn set_bits_lists_every_set_bit_across_words_in_order() {
        let words = [0b1001_0000_0000_0000_0000_0000_0000_0001, 0, 1 << 31, 0b110];
        let bits: Vec<usize> = SetBits::new(&words).collect();
        assert_eq!(bits, [0, 28, 31, 95, 97, 98]);
        assert_eq!(SetBits::new(&[]).count(), 0);
        assert_eq!(SetBits::new(&[0, 0]).count(), 0);
    }

    #[test]
    fn nonzeros_counts_like_a_scalar_filter() {
        // Rows longer than a register, with a tail; -0.0 is zero and NaN is not.
        for (rows, cols) in [(1, 1), (3, 17), (5, 100), (2, 33)] {
            let grad = Array2::from_shape_fn((rows, cols), |(r, c)| match (r * cols + c) % 7 {
                0 => 0.5,
                1 => -0.0,
                2 => f32::NAN,
                3 => -2.0,
                _ => 0.0,
            });
            let expected = grad.iter().filter(|&&v| v != 0.0).count();
            assert_eq!(nonzeros(&grad.view()), expected);
            // Strided rows (a column slice) take the per-value path.
            let strided = grad.slice(ndarray::s![.., ..;2]);
            let expected = strided.iter().filter(|&&v| v != 0.0).count();
            assert_eq!(nonzeros(&strided), expected);
        }
    }
}
