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

use ndarray::{ArrayView2, ArrayView3, ArrayViewMut3};

use super::Conv2dDims;
use crate::simd::{MulAdd, dispatched};

/// Extra values a buffer holds so that a slice of it can start on a 64-byte boundary.
pub(crate) const ALIGN_SLACK: usize = 16;

/// `buffer` from its first 64-byte boundary: the scatter's vector loads and stores are whole
/// 64-byte lines then (image rows and weight rows are multiples of 16 values for C = 32), and
/// a load or store split over two lines costs two.
pub(crate) fn aligned(buffer: &[f32]) -> &[f32] {
    &buffer[buffer.as_ptr().align_offset(64).min(buffer.len())..]
}

/// [`aligned`] for a mutable buffer.
pub(crate) fn aligned_mut(buffer: &mut [f32]) -> &mut [f32] {
    let skip = buffer.as_ptr().align_offset(64).min(buffer.len());
    &mut buffer[skip..]
}

/// Whether scattering beats the dense GEMMs for an output gradient with `nonzeros` of `len`
/// entries: the scatter does `nonzeros / len` of the GEMMs' multiply-adds at about half their
/// speed (measured on conv 32->64), so up to 30% nonzeros it wins.
pub(crate) fn pays(nonzeros: usize, len: usize) -> bool {
    nonzeros * 10 <= len * 3
}

/// The nonzero entries of `grad`.
pub(crate) fn nonzeros(grad: &ArrayView2<'_, f32>) -> usize {
    grad.rows()
        .into_iter()
        .map(|row| row.iter().map(|&v| usize::from(v != 0.0)).sum::<usize>())
        .sum()
}

/// Values in one zero-padded channels-last image `[HP, WP, C]`.
pub(crate) fn image_len(dims: &Conv2dDims) -> usize {
    dims.padded_h() * dims.padded_w() * dims.in_channels
}

/// Where input pixel (h, w) of `x [C, H, W]` starts in the padded channels-last image.
fn pixel_start(dims: &Conv2dDims, h: usize, w: usize) -> usize {
    ((h + dims.pad_top) * dims.padded_w() + w + dims.pad_left) * dims.in_channels
}

/// Writes `x [C, H, W]` into `out` (`image_len` values) as a zero-padded `[HP, WP, C]` image.
pub(crate) fn to_channels_last(dims: &Conv2dDims, x: ArrayView3<'_, f32>, out: &mut [f32]) {
    out.fill(0.0);
    let c_count = dims.in_channels;
    for (c, channel) in x.outer_iter().enumerate() {
        for (h, row) in channel.outer_iter().enumerate() {
            let start = pixel_start(dims, h, 0) + c;
            for (o, &v) in out[start..].iter_mut().step_by(c_count).zip(row.iter()) {
                *o = v;
            }
        }
    }
}

/// A padded channels-last image's interior as `x [C, H, W]` (a strided view).
pub(crate) fn image_view<'a>(dims: &Conv2dDims, image: &'a [f32]) -> ArrayView3<'a, f32> {
    use ndarray::ShapeBuilder;
    let shape = (dims.in_channels, dims.in_h, dims.in_w);
    let strides = (1, dims.padded_w() * dims.in_channels, dims.in_channels);
    ArrayView3::from_shape(shape.strides(strides), &image[pixel_start(dims, 0, 0)..])
        .unwrap_or_else(|e| unreachable!("the interior lies inside the padded image: {e}"))
}

/// Writes the interior of a padded channels-last image `[HP, WP, C]` into `x [C, H, W]`.
pub(crate) fn from_channels_last(dims: &Conv2dDims, image: &[f32], mut x: ArrayViewMut3<'_, f32>) {
    let c_count = dims.in_channels;
    for (c, mut channel) in x.outer_iter_mut().enumerate() {
        for (h, mut row) in channel.outer_iter_mut().enumerate() {
            let start = pixel_start(dims, h, 0) + c;
            for (v, &g) in row.iter_mut().zip(image[start..].iter().step_by(c_count)) {
                *v = g;
            }
        }
    }
}

/// Writes `weight [O, C*KH*KW]` (rows in (c, kh, kw) order) into `out` as `[O, KH, KW, C]`.
pub(crate) fn weight_to_channels_last(dims: &Conv2dDims, weight: &[f32], out: &mut [f32]) {
    let patch = dims.patch_len();
    for (w, out) in weight.chunks_exact(patch).zip(out.chunks_exact_mut(patch)) {
        for (r, &v) in w.iter().enumerate() {
            out[channels_last_index(dims, r)] = v;
        }
    }
}

/// Adds `grad_cl [O, KH, KW, C]` onto `dw [O, C*KH*KW]`.
pub(crate) fn add_from_channels_last(dims: &Conv2dDims, grad_cl: &[f32], dw: &mut [f32]) {
    let patch = dims.patch_len();
    for (g, dw) in grad_cl.chunks_exact(patch).zip(dw.chunks_exact_mut(patch)) {
        for (r, dw) in dw.iter_mut().enumerate() {
            *dw += g[channels_last_index(dims, r)];
        }
    }
}

/// Where row `r` = (c, kh, kw) of an unfolded patch is in the channels-last order (kh, kw, c).
fn channels_last_index(dims: &Conv2dDims, r: usize) -> usize {
    let (c, kh, kw) = dims.tap_of_row(r);
    (kh * dims.kernel_w + kw) * dims.in_channels + c
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
    /// `OH*OW` values of scratch for the nonzero gradients.
    pub(crate) values: &'a mut [f32],
}

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
        let scratch = (&mut *self.corners, &mut *self.values);
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
        scratch: (&mut [usize], &mut [f32]),
    ) => scatter_image_body;
}

#[inline(always)]
fn scatter_image_body<M: MulAdd, const LANES: usize>(
    dims: &Conv2dDims,
    grad: ArrayView2<'_, f32>,
    x_cl: &[f32],
    weight_cl: &[f32],
    dw_cl: &mut [f32],
    mut dx_cl: Option<&mut [f32]>,
    (corners, values): (&mut [usize], &mut [f32]),
) {
    let patch = dims.patch_len();
    let run = dims.kernel_w * dims.in_channels;
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
        // Runs of whole vectors (C = 32) sum dW strip by strip in registers; other runs
        // (lenet5's 6x5 = 30) would end in single values, each a chain of dependent
        // multiply-adds, and are scattered instead. The sums are the same either way.
        let in_registers = run % LANES == 0;
        if in_registers {
            for (dw, kh) in dw.chunks_exact_mut(run).zip(0..) {
                add_fields::<M, LANES>(corners, values, x_cl, kh * row_len, dw);
            }
        }
        for (&corner, &g) in corners.iter().zip(values) {
            for ((dw, w), kh) in dw.chunks_exact_mut(run).zip(w.chunks_exact(run)).zip(0..) {
                let at = corner + kh * row_len;
                if !in_registers {
                    axpy::<M, LANES>(g, &x_cl[at..at + run], dw);
                }
                if let Some(dx) = dx_cl.as_mut() {
                    axpy::<M, LANES>(g, w, &mut dx[at..at + run]);
                }
            }
        }
    }
}

/// `dw += sum_i values[i] * x[corners[i] + offset..][..dw.len()]` for `dw` a whole number of
/// vectors long, strip by strip with each strip's sums held in registers across all the
/// nonzeros, so that a multiply-add loads one operand and stores nothing (scattering each
/// product onto dw would load two and store one). Every value of dw still sums in the order of
/// the nonzeros.
#[inline(always)]
fn add_fields<M: MulAdd, const LANES: usize>(
    corners: &[usize],
    values: &[f32],
    x: &[f32],
    offset: usize,
    dw: &mut [f32],
) {
    let done = add_strips::<M, LANES, 4>(corners, values, x, offset, dw, 0);
    let done = add_strips::<M, LANES, 2>(corners, values, x, offset, dw, done);
    let done = add_strips::<M, LANES, 1>(corners, values, x, offset, dw, done);
    debug_assert_eq!(done, dw.len());
}

/// [`add_fields`] over the whole strips of `V` vectors of `LANES` in `dw[start..]`; returns
/// where they end.
#[inline(always)]
fn add_strips<M: MulAdd, const LANES: usize, const V: usize>(
    corners: &[usize],
    values: &[f32],
    x: &[f32],
    offset: usize,
    dw: &mut [f32],
    start: usize,
) -> usize {
    let mut start = start;
    for strip in dw[start..].chunks_exact_mut(V * LANES) {
        let mut acc = [[0.0f32; LANES]; V];
        for (acc, strip) in acc.iter_mut().zip(strip.chunks_exact(LANES)) {
            acc.copy_from_slice(strip);
        }
        for (&corner, &g) in corners.iter().zip(values) {
            let at = corner + offset + start;
            for (acc, x) in acc
                .iter_mut()
                .zip(x[at..at + V * LANES].chunks_exact(LANES))
            {
                for (a, &x) in acc.iter_mut().zip(x) {
                    *a = M::mul_add(g, x, *a);
                }
            }
        }
        for (acc, strip) in acc.iter().zip(strip.chunks_exact_mut(LANES)) {
            strip.copy_from_slice(acc);
        }
        start += V * LANES;
    }
    start
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
