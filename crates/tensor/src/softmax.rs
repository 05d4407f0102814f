//! Softmax and log-softmax along an axis, numerically stable, with their backward passes.
//!
//! Stability: every lane is shifted by its maximum before `exp`, so the largest exponent is 0;
//! `[1000, 1001, -1000]` gives finite probabilities and log-probabilities.

use ndarray::{ArrayView, ArrayViewMut, Axis, Dimension, Zip};

use crate::error::{TensorError, expect_shape};

/// `y = exp(x - max) / sum(exp(x - max))` along `axis`.
pub fn softmax<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    axis: Axis,
    mut y: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    check("softmax", &x, axis, &y)?;
    Zip::from(x.lanes(axis))
        .and(y.lanes_mut(axis))
        .for_each(|x, mut y| {
            let max = x.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            Zip::from(&mut y)
                .and(&x)
                .for_each(|y, &x| *y = (x - max).exp());
            let sum: f32 = y.sum();
            y.map_inplace(|v| *v /= sum);
        });
    Ok(())
}

/// `y = x - max - ln(sum(exp(x - max)))` along `axis`.
pub fn log_softmax<D: Dimension>(
    x: ArrayView<'_, f32, D>,
    axis: Axis,
    mut y: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    check("log_softmax", &x, axis, &y)?;
    Zip::from(x.lanes(axis))
        .and(y.lanes_mut(axis))
        .for_each(|x, mut y| {
            let max = x.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let log_sum = x.fold(0.0f32, |s, &v| s + (v - max).exp()).ln();
            Zip::from(&mut y)
                .and(&x)
                .for_each(|y, &x| *y = x - max - log_sum);
        });
    Ok(())
}

/// `dx = y * (dy - sum(dy * y))` along `axis`, given softmax's output `y`.
pub fn softmax_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    dy: ArrayView<'_, f32, D>,
    axis: Axis,
    mut dx: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    check("softmax_backward", &y, axis, &dx)?;
    expect_shape("softmax_backward", "output gradient", dy.shape(), y.shape())?;
    Zip::from(y.lanes(axis))
        .and(dy.lanes(axis))
        .and(dx.lanes_mut(axis))
        .for_each(|y, dy, mut dx| {
            let dot: f32 = Zip::from(&y).and(&dy).fold(0.0, |s, &y, &g| s + y * g);
            Zip::from(&mut dx)
                .and(&y)
                .and(&dy)
                .for_each(|dx, &y, &g| *dx = y * (g - dot));
        });
    Ok(())
}

/// `dx = dy - exp(y) * sum(dy)` along `axis`, given log-softmax's output `y`.
pub fn log_softmax_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    dy: ArrayView<'_, f32, D>,
    axis: Axis,
    mut dx: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    check("log_softmax_backward", &y, axis, &dx)?;
    expect_shape(
        "log_softmax_backward",
        "output gradient",
        dy.shape(),
        y.shape(),
    )?;
    Zip::from(y.lanes(axis))
        .and(dy.lanes(axis))
        .and(dx.lanes_mut(axis))
        .for_each(|y, dy, mut dx| {
            let total: f32 = dy.sum();
            Zip::from(&mut dx)
                .and(&y)
                .and(&dy)
                .for_each(|dx, &y, &g| *dx = g - y.exp() * total);
        });
    Ok(())
}

fn check<D: Dimension>(
    op: &'static str,
    x: &ArrayView<'_, f32, D>,
    axis: Axis,
    y: &ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    if axis.index() >= x.ndim() {
        return Err(TensorError::Config {
            op,
            detail: format!("axis {} of a {}-dimensional array", axis.index(), x.ndim()),
        });
    }
    expect_shape(op, "output", y.shape(), x.shape())
}
