//! Elementwise activations, forward in place and backward side by side. Each backward takes the
//! forward's *output* `y`, which is all these derivatives need, so the input need not be kept.

use ndarray::{ArrayView, ArrayViewMut, Dimension, Zip};

use crate::error::{TensorError, expect_shape};

/// `x = max(x, 0)`.
pub fn relu<D: Dimension>(mut x: ArrayViewMut<'_, f32, D>) {
    x.map_inplace(|v| *v = v.max(0.0));
}

/// `dx = dy` where `y > 0`, else 0 (the subgradient at 0 is 0, as in PyTorch).
pub fn relu_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    dy: ArrayView<'_, f32, D>,
    dx: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    backward(
        "relu_backward",
        y,
        dy,
        dx,
        |y, g| if y > 0.0 { g } else { 0.0 },
    )
}

/// `x = x` where `x > 0`, else `slope * x`.
pub fn leaky_relu<D: Dimension>(mut x: ArrayViewMut<'_, f32, D>, slope: f32) {
    x.map_inplace(|v| {
        if *v <= 0.0 {
            *v *= slope;
        }
    });
}

/// `dx = dy` where `y > 0`, else `slope * dy`; `slope` must be positive, so `y`'s sign is `x`'s.
pub fn leaky_relu_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    dy: ArrayView<'_, f32, D>,
    dx: ArrayViewMut<'_, f32, D>,
    slope: f32,
) -> Result<(), TensorError> {
    if slope.is_nan() || slope <= 0.0 {
        return Err(TensorError::Config {
            op: "leaky_relu_backward",
            detail: format!("slope {slope} must be positive to recover the sign of x from y"),
        });
    }
    backward("leaky_relu_backward", y, dy, dx, |y, g| {
        if y > 0.0 { g } else { slope * g }
    })
}

/// `x = 1 / (1 + exp(-x))`, computed without overflow for large `|x|`.
pub fn sigmoid<D: Dimension>(mut x: ArrayViewMut<'_, f32, D>) {
    x.map_inplace(|v| {
        *v = if *v >= 0.0 {
            1.0 / (1.0 + (-*v).exp())
        } else {
            let e = v.exp();
            e / (1.0 + e)
        }
    });
}

/// `dx = dy * y * (1 - y)`.
pub fn sigmoid_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    dy: ArrayView<'_, f32, D>,
    dx: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    backward("sigmoid_backward", y, dy, dx, |y, g| g * y * (1.0 - y))
}

/// `x = tanh(x)`.
pub fn tanh<D: Dimension>(mut x: ArrayViewMut<'_, f32, D>) {
    x.map_inplace(|v| *v = v.tanh());
}

/// `dx = dy * (1 - y^2)`.
pub fn tanh_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    dy: ArrayView<'_, f32, D>,
    dx: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    backward("tanh_backward", y, dy, dx, |y, g| g * (1.0 - y * y))
}

/// `dx = f(y, dy)` elementwise, after checking the three shapes agree.
fn backward<D: Dimension>(
    op: &'static str,
    y: ArrayView<'_, f32, D>,
    dy: ArrayView<'_, f32, D>,
    mut dx: ArrayViewMut<'_, f32, D>,
    f: impl Fn(f32, f32) -> f32,
) -> Result<(), TensorError> {
    expect_shape(op, "output gradient", dy.shape(), y.shape())?;
    expect_shape(op, "input gradient", dx.shape(), y.shape())?;
    Zip::from(&mut dx)
        .and(&y)
        .and(&dy)
        .for_each(|dx, &y, &g| *dx = f(y, g));
    Ok(())
}
