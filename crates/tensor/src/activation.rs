//! Elementwise activations, forward and backward side by side, both in place: forward turns `x`
//! into `y`, backward turns the output gradient into the input gradient. Each backward takes the
//! forward's *output* `y`, which is all these derivatives need, so the input need not be kept.
//! Large arrays are split across threads; elementwise work gives the same bits either way.

use ndarray::{ArrayView, ArrayViewMut, Dimension, Zip};

use crate::error::{TensorError, expect_shape};

/// `x = max(x, 0)`.
pub fn relu<D: Dimension>(x: ArrayViewMut<'_, f32, D>) {
    map_inplace(x, |v| *v = v.max(0.0));
}

/// `grad`: `dy` in, `dx` out, with `dx = dy` where `y > 0`, else 0 (the subgradient at 0 is 0,
/// as in PyTorch).
pub fn relu_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    grad: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    backward(
        "relu_backward",
        y,
        grad,
        |y, g| if y > 0.0 { g } else { 0.0 },
    )
}

/// `x = x` where `x > 0`, else `slope * x`.
pub fn leaky_relu<D: Dimension>(x: ArrayViewMut<'_, f32, D>, slope: f32) {
    map_inplace(x, |v| {
        if *v <= 0.0 {
            *v *= slope;
        }
    });
}

/// `grad`: `dy` in, `dx` out, with `dx = dy` where `y > 0`, else `slope * dy`; `slope` must be
/// positive, so that `y`'s sign is `x`'s.
pub fn leaky_relu_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    grad: ArrayViewMut<'_, f32, D>,
    slope: f32,
) -> Result<(), TensorError> {
    if slope.is_nan() || slope <= 0.0 {
        return Err(TensorError::Config {
            op: "leaky_relu_backward",
            detail: format!("slope {slope} must be positive to recover the sign of x from y"),
        });
    }
    backward("leaky_relu_backward", y, grad, |y, g| {
        if y > 0.0 { g } else { slope * g }
    })
}

/// `x = 1 / (1 + exp(-x))`, computed without overflow for large `|x|`.
pub fn sigmoid<D: Dimension>(x: ArrayViewMut<'_, f32, D>) {
    map_inplace(x, |v| {
        *v = if *v >= 0.0 {
            1.0 / (1.0 + (-*v).exp())
        } else {
            let e = v.exp();
            e / (1.0 + e)
        }
    });
}

/// `grad`: `dy` in, `dx = dy * y * (1 - y)` out.
pub fn sigmoid_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    grad: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    backward("sigmoid_backward", y, grad, |y, g| g * y * (1.0 - y))
}

/// `x = tanh(x)`.
pub fn tanh<D: Dimension>(x: ArrayViewMut<'_, f32, D>) {
    map_inplace(x, |v| *v = v.tanh());
}

/// `grad`: `dy` in, `dx = dy * (1 - y^2)` out.
pub fn tanh_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    grad: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    backward("tanh_backward", y, grad, |y, g| g * (1.0 - y * y))
}

/// Elementwise work on at least this many values is split across threads; below it, handing
/// it off costs more than the pass.
const PARALLEL_MIN_LEN: usize = 1 << 15;

/// `f` applied to every value of `x`.
fn map_inplace<D: Dimension>(mut x: ArrayViewMut<'_, f32, D>, f: impl Fn(&mut f32) + Sync + Send) {
    if x.len() >= PARALLEL_MIN_LEN {
        x.par_map_inplace(f);
    } else {
        x.map_inplace(f);
    }
}

/// `grad = f(y, grad)` elementwise, after checking the shapes agree.
fn backward<D: Dimension>(
    op: &'static str,
    y: ArrayView<'_, f32, D>,
    mut grad: ArrayViewMut<'_, f32, D>,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Result<(), TensorError> {
    expect_shape(op, "output gradient", grad.shape(), y.shape())?;
    let zip = Zip::from(&mut grad).and(&y);
    let apply = |g: &mut f32, &y: &f32| *g = f(y, *g);
    if y.len() >= PARALLEL_MIN_LEN {
        zip.par_for_each(apply);
    } else {
        zip.for_each(apply);
    }
    Ok(())
}
