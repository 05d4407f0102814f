//! Bias addition and its gradient, a sum over every axis but the bias's.

use ndarray::{
    ArrayView1, ArrayView2, ArrayView4, ArrayViewMut1, ArrayViewMut2, ArrayViewMut4, Axis, Zip,
};

use crate::error::{TensorError, expect_shape};

/// `x[n, c, h, w] += bias[c]`.
pub fn add_channel_bias(
    mut x: ArrayViewMut4<'_, f32>,
    bias: ArrayView1<'_, f32>,
) -> Result<(), TensorError> {
    expect_shape(
        "add_channel_bias",
        "bias",
        bias.shape(),
        &[x.len_of(Axis(1))],
    )?;
    for mut image in x.outer_iter_mut() {
        Zip::from(image.outer_iter_mut())
            .and(&bias)
            .for_each(|mut plane, &b| plane += b);
    }
    Ok(())
}

/// `db[c] += sum over n, h, w of dy[n, c, h, w]`.
pub fn channel_bias_grad(
    dy: ArrayView4<'_, f32>,
    mut db: ArrayViewMut1<'_, f32>,
) -> Result<(), TensorError> {
    expect_shape(
        "channel_bias_grad",
        "bias gradient",
        db.shape(),
        &[dy.len_of(Axis(1))],
    )?;
    for image in dy.outer_iter() {
        Zip::from(&mut db)
            .and(image.outer_iter())
            .for_each(|b, plane| *b += plane.sum());
    }
    Ok(())
}

/// `x[n, f] += bias[f]`.
pub fn add_row_bias(
    mut x: ArrayViewMut2<'_, f32>,
    bias: ArrayView1<'_, f32>,
) -> Result<(), TensorError> {
    expect_shape("add_row_bias", "bias", bias.shape(), &[x.ncols()])?;
    x += &bias;
    Ok(())
}

/// `db[f] += sum over n of dy[n, f]`.
pub fn row_bias_grad(
    dy: ArrayView2<'_, f32>,
    mut db: ArrayViewMut1<'_, f32>,
) -> Result<(), TensorError> {
    expect_shape("row_bias_grad", "bias gradient", db.shape(), &[dy.ncols()])?;
    for row in dy.outer_iter() {
        db += &row;
    }
    Ok(())
}
