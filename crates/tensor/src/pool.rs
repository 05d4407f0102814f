//! 2-D pooling over NCHW f32, forward and backward side by side: max (remembering the argmax),
//! average, and global average.
//!
//! Shapes: `x [N, C, H, W]` to `y [N, C, OH, OW]` with OH = (H - KH) / stride + 1 (no padding,
//! as Keras' `MaxPooling2D` by default); global average pooling gives `[N, C]`. Inputs may have
//! any strides; the window kernels' outputs must be in standard layout. Parallel over planes.

use ndarray::{ArrayView2, ArrayView4, ArrayViewMut2, ArrayViewMut4, Zip};
use rayon::prelude::*;

use crate::error::{TensorError, expect_shape};

/// Every size of one pooling: the one source of truth for its output size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dDims {
    /// N.
    pub batch: usize,
    /// C.
    pub channels: usize,
    /// H.
    pub in_h: usize,
    /// W.
    pub in_w: usize,
    /// KH.
    pub kernel_h: usize,
    /// KW.
    pub kernel_w: usize,
    /// Vertical stride.
    pub stride_h: usize,
    /// Horizontal stride.
    pub stride_w: usize,
}

impl Pool2dDims {
    /// Dimensions for an input `[N, C, H, W]`, windows `kernel` `[KH, KW]` moved by `stride`.
    pub fn new(
        input: [usize; 4],
        kernel: [usize; 2],
        stride: [usize; 2],
    ) -> Result<Self, TensorError> {
        let [batch, channels, in_h, in_w] = input;
        let [kernel_h, kernel_w] = kernel;
        let [stride_h, stride_w] = stride;
        if kernel_h == 0 || kernel_w == 0 || stride_h == 0 || stride_w == 0 {
            return Err(TensorError::Config {
                op: "pool2d",
                detail: format!("kernel {kernel:?} and stride {stride:?} must be at least 1"),
            });
        }
        if kernel_h > in_h || kernel_w > in_w {
            return Err(TensorError::Config {
                op: "pool2d",
                detail: format!(
                    "window {kernel_h}x{kernel_w} is larger than the input {in_h}x{in_w}"
                ),
            });
        }
        Ok(Pool2dDims {
            batch,
            channels,
            in_h,
            in_w,
            kernel_h,
            kernel_w,
            stride_h,
            stride_w,
        })
    }

    /// OH = (H - KH) / stride_h + 1.
    pub fn out_h(&self) -> usize {
        (self.in_h - self.kernel_h) / self.stride_h + 1
    }

    /// OW = (W - KW) / stride_w + 1.
    pub fn out_w(&self) -> usize {
        (self.in_w - self.kernel_w) / self.stride_w + 1
    }

    /// Where window (oh, ow) starts in its input plane, as `ih * W + iw`.
    pub fn window_corner(&self, oh: usize, ow: usize) -> usize {
        oh * self.stride_h * self.in_w + ow * self.stride_w
    }

    /// `[N, C, H, W]`.
    pub fn input_shape(&self) -> [usize; 4] {
        [self.batch, self.channels, self.in_h, self.in_w]
    }

    /// `[N, C, OH, OW]`.
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.channels, self.out_h(), self.out_w()]
    }

    /// Whether the windows are 2x2 and moved by 2, the pooling of every reference model, which
    /// the kernels take by unrolled, vectorized loops.
    pub(crate) fn is_2x2_stride_2(&self) -> bool {
        (self.kernel_h, self.kernel_w, self.stride_h, self.stride_w) == (2, 2, 2, 2)
    }
}

/// Whether `v`, met after `best` in a window's scan order, takes its place: a larger value or
/// the first NaN does, a tie does not (the first maximum wins). The fused kernels decide by
/// this, and the loops below by the same rule, so they all give the same argmax. Without
/// short-circuits, so that it compiles to selects in the fused kernels' vector loops.
#[inline(always)]
pub(crate) fn replaces_max(v: f32, best: f32) -> bool {
    (v > best) | (v.is_nan() & !best.is_nan())
}

/// `y` = the maximum of each window; `argmax` = its position `ih * W + iw` in the input plane
/// (the first one, in scan order, on ties; a NaN wins, as in PyTorch).
pub fn max_pool2d_forward(
    dims: &Pool2dDims,
    x: ArrayView4<'_, f32>,
    mut y: ArrayViewMut4<'_, f32>,
    mut argmax: ArrayViewMut4<'_, u32>,
) -> Result<(), TensorError> {
    const OP: &str = "max_pool2d_forward";
    check_pool_shapes(OP, dims, x.shape(), y.shape())?;
    expect_shape(OP, "argmax", argmax.shape(), &dims.output_shape())?;
    if dims.in_h * dims.in_w > u32::MAX as usize {
        return Err(TensorError::Config {
            op: OP,
            detail: "input planes over 2^32 pixels".into(),
        });
    }
    let x = x.as_standard_layout();
    let x = elements(&x);
    let out_len = dims.out_h() * dims.out_w();
    let y = elements_mut(OP, "output", &mut y)?;
    let argmax = elements_mut(OP, "argmax", &mut argmax)?;
    x.par_chunks(dims.in_h * dims.in_w)
        .zip(y.par_chunks_mut(out_len))
        .zip(argmax.par_chunks_mut(out_len))
        .with_min_len(MIN_PLANES_PER_TASK)
        .for_each(|((plane, out), arg)| max_pool_plane(dims, plane, out, arg, |v| v));
    Ok(())
}

/// One plane of [`max_pool2d_forward`] over `value` of each input (the identity, or the ReLU
/// of a fused convolution).
#[inline(always)]
pub(crate) fn max_pool_plane(
    dims: &Pool2dDims,
    plane: &[f32],
    out: &mut [f32],
    argmax: &mut [u32],
    value: impl Fn(f32) -> f32,
) {
    // The 2x2 windows of every reference model get a copy with the window unrolled, and
    // without overlap, one written so that it vectorizes.
    if dims.is_2x2_stride_2() {
        max_pool_2x2_tiles(dims, plane, out, argmax, value);
    } else if (dims.kernel_h, dims.kernel_w) == (2, 2) {
        max_pool_windows(dims, 2, 2, plane, out, argmax, value);
    } else {
        max_pool_windows(
            dims,
            dims.kernel_h,
            dims.kernel_w,
            plane,
            out,
            argmax,
            value,
        );
    }
}

/// [`max_pool_plane`] with 2x2 windows moved by 2: each output row reads two input rows in
/// pairs of values, with no index arithmetic inside the loop.
#[inline(always)]
fn max_pool_2x2_tiles(
    dims: &Pool2dDims,
    plane: &[f32],
    out: &mut [f32],
    argmax: &mut [u32],
    value: impl Fn(f32) -> f32,
) {
    let (in_w, out_w) = (dims.in_w, dims.out_w());
    let below = in_w as u32;
    for ((oh, out), argmax) in out
        .chunks_exact_mut(out_w)
        .enumerate()
        .zip(argmax.chunks_exact_mut(out_w))
    {
        let corner = 2 * oh * in_w;
        let top = &plane[corner..corner + 2 * out_w];
        let bottom = &plane[corner + in_w..corner + in_w + 2 * out_w];
        let pairs = top.chunks_exact(2).zip(bottom.chunks_exact(2));
        for (ow, ((o, a), (t, b))) in out.iter_mut().zip(argmax.iter_mut()).zip(pairs).enumerate() {
            // In scan order, as every pooling loop. The rule of `replaces_max`, written with
            // short-circuits: here they compile to faster code (64x64x11x11: 118 us against
            // 230 with the helper; the fused kernels are the other way round).
            let mut best = value(t[0]);
            let mut at = 0;
            for (v, offset) in [(t[1], 1), (b[0], below), (b[1], below + 1)] {
                let v = value(v);
                let wins = v > best || (v.is_nan() && !best.is_nan());
                best = if wins { v } else { best };
                at = if wins { offset } else { at };
            }
            *o = best;
            *a = (corner + 2 * ow) as u32 + at;
        }
    }
}

/// [`max_pool_plane`] with windows of `kernel_h` x `kernel_w`.
#[inline(always)]
fn max_pool_windows(
    dims: &Pool2dDims,
    kernel_h: usize,
    kernel_w: usize,
    plane: &[f32],
    out: &mut [f32],
    argmax: &mut [u32],
    value: impl Fn(f32) -> f32,
) {
    let out_w = dims.out_w();
    for ((oh, out), argmax) in out
        .chunks_exact_mut(out_w)
        .enumerate()
        .zip(argmax.chunks_exact_mut(out_w))
    {
        for ((ow, o), a) in out.iter_mut().enumerate().zip(argmax.iter_mut()) {
            let corner = dims.window_corner(oh, ow);
            let mut best_at = corner;
            let mut best = value(plane[corner]);
            for kh in 0..kernel_h {
                let row = corner + kh * dims.in_w;
                for (at, &v) in plane[row..row + kernel_w].iter().enumerate() {
                    let v = value(v);
                    // Selects rather than branches: on real activations which value wins is
                    // unpredictable, and a mispredicted branch per window costs more than
                    // the comparison.
                    // The rule of `replaces_max` (see the loop above).
                    let wins = v > best || (v.is_nan() && !best.is_nan());
                    best = if wins { v } else { best };
                    best_at = if wins { row + at } else { best_at };
                }
            }
            *o = best;
            *a = best_at as u32;
        }
    }
}

/// `dx` (overwritten) gets each `dy` added at its window's argmax; elsewhere 0.
pub fn max_pool2d_backward(
    dims: &Pool2dDims,
    dy: ArrayView4<'_, f32>,
    argmax: ArrayView4<'_, u32>,
    mut dx: ArrayViewMut4<'_, f32>,
) -> Result<(), TensorError> {
    const OP: &str = "max_pool2d_backward";
    check_pool_shapes(OP, dims, dx.shape(), dy.shape())?;
    expect_shape(OP, "argmax", argmax.shape(), &dims.output_shape())?;
    let plane_len = dims.in_h * dims.in_w;
    if let Some(&bad) = argmax.iter().find(|&&a| a as usize >= plane_len) {
        return Err(TensorError::Shape {
            op: OP,
            detail: format!("argmax {bad} is outside the {plane_len}-pixel input plane"),
        });
    }
    let out_len = dims.out_h() * dims.out_w();
    let (dy, argmax) = (dy.as_standard_layout(), argmax.as_standard_layout());
    let (dy, argmax) = (elements(&dy), elements(&argmax));
    let dx = elements_mut(OP, "input gradient", &mut dx)?;
    dx.par_chunks_mut(plane_len)
        .zip(dy.par_chunks(out_len))
        .zip(argmax.par_chunks(out_len))
        .with_min_len(MIN_PLANES_PER_TASK)
        .for_each(|((dx, dy), argmax)| {
            dx.fill(0.0);
            for (&g, &at) in dy.iter().zip(argmax) {
                dx[at as usize] += g;
            }
        });
    Ok(())
}

/// `y` = the mean of each window.
pub fn avg_pool2d_forward(
    dims: &Pool2dDims,
    x: ArrayView4<'_, f32>,
    mut y: ArrayViewMut4<'_, f32>,
) -> Result<(), TensorError> {
    const OP: &str = "avg_pool2d_forward";
    check_pool_shapes(OP, dims, x.shape(), y.shape())?;
    let scale = 1.0 / (dims.kernel_h * dims.kernel_w) as f32;
    let (plane_len, out_w) = (dims.in_h * dims.in_w, dims.out_w());
    let x = x.as_standard_layout();
    let x = elements(&x);
    let y = elements_mut(OP, "output", &mut y)?;
    x.par_chunks(plane_len)
        .zip(y.par_chunks_mut(dims.out_h() * out_w))
        .with_min_len(MIN_PLANES_PER_TASK)
        .for_each(|(plane, out)| {
            for (oh, out) in out.chunks_exact_mut(out_w).enumerate() {
                for (ow, o) in out.iter_mut().enumerate() {
                    let corner = dims.window_corner(oh, ow);
                    let sum: f32 = (0..dims.kernel_h)
                        .map(|kh| {
                            let row = corner + kh * dims.in_w;
                            plane[row..row + dims.kernel_w].iter().sum::<f32>()
                        })
                        .sum();
                    *o = sum * scale;
                }
            }
        });
    Ok(())
}

/// `dx` (overwritten) gets each `dy` spread evenly over its window.
pub fn avg_pool2d_backward(
    dims: &Pool2dDims,
    dy: ArrayView4<'_, f32>,
    mut dx: ArrayViewMut4<'_, f32>,
) -> Result<(), TensorError> {
    const OP: &str = "avg_pool2d_backward";
    check_pool_shapes(OP, dims, dx.shape(), dy.shape())?;
    let scale = 1.0 / (dims.kernel_h * dims.kernel_w) as f32;
    let (plane_len, out_w) = (dims.in_h * dims.in_w, dims.out_w());
    let dy = dy.as_standard_layout();
    let dy = elements(&dy);
    let dx = elements_mut(OP, "input gradient", &mut dx)?;
    dx.par_chunks_mut(plane_len)
        .zip(dy.par_chunks(dims.out_h() * out_w))
        .with_min_len(MIN_PLANES_PER_TASK)
        .for_each(|(dx, dy)| {
            dx.fill(0.0);
            for (oh, dy) in dy.chunks_exact(out_w).enumerate() {
                for (ow, &g) in dy.iter().enumerate() {
                    let corner = dims.window_corner(oh, ow);
                    for kh in 0..dims.kernel_h {
                        let row = corner + kh * dims.in_w;
                        for v in &mut dx[row..row + dims.kernel_w] {
                            *v += g * scale;
                        }
                    }
                }
            }
        });
    Ok(())
}

/// Planes handed to one task at least: a 26x26 plane takes well under a microsecond, so
/// smaller tasks would cost more to schedule than to run.
const MIN_PLANES_PER_TASK: usize = 16;

/// A standard-layout array's elements, which the kernels cut into planes.
fn elements<'a, T>(a: &'a ndarray::CowArray<'_, T, ndarray::Ix4>) -> &'a [T] {
    a.as_slice()
        .unwrap_or_else(|| unreachable!("as_standard_layout gives a contiguous array"))
}

/// An output's elements, which must be in standard layout.
fn elements_mut<'a, T>(
    op: &'static str,
    operand: &'static str,
    a: &'a mut ArrayViewMut4<'_, T>,
) -> Result<&'a mut [T], TensorError> {
    a.as_slice_mut().ok_or(TensorError::Layout { op, operand })
}

/// `y [N, C]` = the mean of each input plane `x [N, C, H, W]`.
pub fn global_avg_pool_forward(
    x: ArrayView4<'_, f32>,
    mut y: ArrayViewMut2<'_, f32>,
) -> Result<(), TensorError> {
    let [n, c, h, w] = dims4(x.shape());
    expect_shape("global_avg_pool_forward", "output", y.shape(), &[n, c])?;
    let scale = 1.0 / (h * w).max(1) as f32;
    Zip::from(x.outer_iter())
        .and(y.outer_iter_mut())
        .par_for_each(|x, mut y| {
            for (plane, o) in x.outer_iter().zip(y.iter_mut()) {
                *o = plane.sum() * scale;
            }
        });
    Ok(())
}

/// `dx [N, C, H, W]` (overwritten) = `dy [N, C]` spread evenly over each plane.
pub fn global_avg_pool_backward(
    dy: ArrayView2<'_, f32>,
    mut dx: ArrayViewMut4<'_, f32>,
) -> Result<(), TensorError> {
    let [n, c, h, w] = dims4(dx.shape());
    expect_shape(
        "global_avg_pool_backward",
        "output gradient",
        dy.shape(),
        &[n, c],
    )?;
    let scale = 1.0 / (h * w).max(1) as f32;
    Zip::from(dx.outer_iter_mut())
        .and(dy.outer_iter())
        .par_for_each(|mut dx, dy| {
            for (mut plane, &g) in dx.outer_iter_mut().zip(dy.iter()) {
                plane.fill(g * scale);
            }
        });
    Ok(())
}

fn check_pool_shapes(
    op: &'static str,
    dims: &Pool2dDims,
    input: &[usize],
    output: &[usize],
) -> Result<(), TensorError> {
    expect_shape(op, "input", input, &dims.input_shape())?;
    expect_shape(op, "output", output, &dims.output_shape())
}

fn dims4(shape: &[usize]) -> [usize; 4] {
    [shape[0], shape[1], shape[2], shape[3]]
}
