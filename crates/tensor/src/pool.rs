//! 2-D pooling over NCHW f32, forward and backward side by side: max (remembering the argmax),
//! average, and global average.
//!
//! Shapes: `x [N, C, H, W]` to `y [N, C, OH, OW]` with OH = (H - KH) / stride + 1 (no padding,
//! as Keras' `MaxPooling2D` by default); global average pooling gives `[N, C]`.

use ndarray::{ArrayView2, ArrayView4, ArrayViewMut2, ArrayViewMut4, Zip};

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

    /// `[N, C, H, W]`.
    pub fn input_shape(&self) -> [usize; 4] {
        [self.batch, self.channels, self.in_h, self.in_w]
    }

    /// `[N, C, OH, OW]`.
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.channels, self.out_h(), self.out_w()]
    }
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
    Zip::from(x.outer_iter())
        .and(y.outer_iter_mut())
        .and(argmax.outer_iter_mut())
        .par_for_each(|x, mut y, mut argmax| {
            for ((plane, mut out), mut arg) in x
                .outer_iter()
                .zip(y.outer_iter_mut())
                .zip(argmax.outer_iter_mut())
            {
                for (((oh, ow), o), a) in out.indexed_iter_mut().zip(arg.iter_mut()) {
                    let (top, left) = (oh * dims.stride_h, ow * dims.stride_w);
                    let mut best = f32::NEG_INFINITY;
                    let mut best_at = top * dims.in_w + left;
                    for ih in top..top + dims.kernel_h {
                        for iw in left..left + dims.kernel_w {
                            let v = plane[(ih, iw)];
                            if v > best || (v.is_nan() && !best.is_nan()) {
                                best = v;
                                best_at = ih * dims.in_w + iw;
                            }
                        }
                    }
                    *o = best;
                    *a = best_at as u32;
                }
            }
        });
    Ok(())
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
    Zip::from(dx.outer_iter_mut())
        .and(dy.outer_iter())
        .and(argmax.outer_iter())
        .par_for_each(|mut dx, dy, argmax| {
            dx.fill(0.0);
            for ((mut plane, dy), argmax) in dx
                .outer_iter_mut()
                .zip(dy.outer_iter())
                .zip(argmax.outer_iter())
            {
                for (&g, &at) in dy.iter().zip(argmax.iter()) {
                    let at = at as usize;
                    plane[(at / dims.in_w, at % dims.in_w)] += g;
                }
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
    check_pool_shapes("avg_pool2d_forward", dims, x.shape(), y.shape())?;
    let scale = 1.0 / (dims.kernel_h * dims.kernel_w) as f32;
    Zip::from(x.outer_iter())
        .and(y.outer_iter_mut())
        .par_for_each(|x, mut y| {
            for (plane, mut out) in x.outer_iter().zip(y.outer_iter_mut()) {
                for ((oh, ow), o) in out.indexed_iter_mut() {
                    let (top, left) = (oh * dims.stride_h, ow * dims.stride_w);
                    let window = plane.slice(ndarray::s![
                        top..top + dims.kernel_h,
                        left..left + dims.kernel_w
                    ]);
                    *o = window.sum() * scale;
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
    check_pool_shapes("avg_pool2d_backward", dims, dx.shape(), dy.shape())?;
    let scale = 1.0 / (dims.kernel_h * dims.kernel_w) as f32;
    Zip::from(dx.outer_iter_mut())
        .and(dy.outer_iter())
        .par_for_each(|mut dx, dy| {
            dx.fill(0.0);
            for (mut plane, dy) in dx.outer_iter_mut().zip(dy.outer_iter()) {
                for ((oh, ow), &g) in dy.indexed_iter() {
                    let (top, left) = (oh * dims.stride_h, ow * dims.stride_w);
                    plane
                        .slice_mut(ndarray::s![
                            top..top + dims.kernel_h,
                            left..left + dims.kernel_w
                        ])
                        .map_inplace(|v| *v += g * scale);
                }
            }
        });
    Ok(())
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
