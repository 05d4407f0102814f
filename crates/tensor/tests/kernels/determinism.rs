//! The same inputs give the same bits with one thread and with two.

use ndarray::{Array1, Array2, Array3, Array4};
use tensor::{
    ChannelNormalization, Conv2dBuffers, Conv2dDims, Conv2dGrads, Padding, Pool2dDims,
    batch_norm_backward, batch_norm_forward, channel_mean_var, conv2d_backward, conv2d_forward,
    gemm_parallel, max_pool2d_backward, max_pool2d_forward,
};

use crate::reference::Values;

/// Every output of a conv + pool forward and backward (computed by im2col + GEMM, directly and
/// by the implicit GEMM), and a large GEMM, as bits.
fn run_everything() -> Vec<u32> {
    let mut values = Values::new(11);
    let mut bits = conv_and_pool(&mut values, 8, 16);
    bits.extend(conv_and_pool(&mut values, 1, 16));
    bits.extend(conv_and_pool(&mut values, 8, 64));

    let a = values.array2((300, 170));
    let bm = values.array2((170, 260));
    let mut c = Array2::zeros((300, 260));
    gemm_parallel(1.0, a.view(), bm.view(), 0.0, c.view_mut()).unwrap();
    bits.extend(c.iter().map(|v| v.to_bits()));
    bits.extend(batch_norm(&mut values));
    bits
}

/// Batch normalization's statistics, forward and backward over 16 images of 8 channels.
fn batch_norm(values: &mut Values) -> Vec<u32> {
    let shape = (16, 8, 196);
    let x = Array3::from_shape_simple_fn(shape, || values.next());
    let mut dx = Array3::from_shape_simple_fn(shape, || values.next());
    let (gamma, beta) = (values.array1(8), values.array1(8));
    let (mean, var) = channel_mean_var(x.view()).unwrap();
    let mean = Array1::from_iter(mean.iter().map(|&m| m as f32));
    let inv_std = Array1::from_iter(var.iter().map(|&v| 1.0 / (v as f32 + 1e-5).sqrt()));
    let normalization = ChannelNormalization {
        mean: mean.view(),
        inv_std: inv_std.view(),
        gamma: gamma.view(),
        beta: beta.view(),
    };
    let mut y = Array3::zeros(shape);
    batch_norm_forward(x.view(), y.view_mut(), normalization, true).unwrap();
    let (mut dgamma, mut dbeta) = (Array1::zeros(8), Array1::zeros(8));
    batch_norm_backward(
        dx.view_mut(),
        x.view(),
        normalization,
        true,
        dgamma.view_mut(),
        dbeta.view_mut(),
        true,
    )
    .unwrap();
    mean.iter()
        .chain(&inv_std)
        .chain(&y)
        .chain(&dx)
        .chain(&dgamma)
        .chain(&dbeta)
        .map(|v| v.to_bits())
        .collect()
}

/// The outputs of a 3x3 conv of `channels` channels into `outputs` and a 2x2 max pool, forward
/// and backward.
fn conv_and_pool(values: &mut Values, channels: usize, outputs: usize) -> Vec<u32> {
    let dims = Conv2dDims::new(
        [19, channels, 12, 12],
        outputs,
        [3, 3],
        [1, 1],
        Padding::Same,
    )
    .unwrap();
    let x = values.array4(dims.input_shape());
    let w = values.array4(dims.weight_shape());
    let b = values.array1(outputs);
    let mut buffers = Conv2dBuffers::default();
    let mut y = Array4::zeros(dims.output_shape());
    conv2d_forward(
        &dims,
        x.view(),
        w.view(),
        Some(b.view()),
        &mut buffers,
        tensor::Backward::Needed,
        y.view_mut(),
    )
    .unwrap();

    let pool = Pool2dDims::new(dims.output_shape(), [2, 2], [2, 2]).unwrap();
    let mut pooled = Array4::zeros(pool.output_shape());
    let mut argmax = Array4::zeros(pool.output_shape());
    max_pool2d_forward(&pool, y.view(), pooled.view_mut(), argmax.view_mut()).unwrap();
    let dpooled = values.array4(pool.output_shape());
    let mut dy = Array4::zeros(dims.output_shape());
    max_pool2d_backward(&pool, dpooled.view(), argmax.view(), dy.view_mut()).unwrap();

    let mut dw = Array4::zeros(dims.weight_shape());
    let mut db = Array1::zeros(outputs);
    let mut dx = Array4::zeros(dims.input_shape());
    conv2d_backward(
        &dims,
        w.view(),
        dy.view(),
        &mut buffers,
        Conv2dGrads {
            weight: dw.view_mut(),
            bias: Some(db.view_mut()),
            input: Some(dx.view_mut()),
        },
    )
    .unwrap();

    y.iter()
        .chain(&dw)
        .chain(&db)
        .chain(&dx)
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn one_and_two_threads_give_identical_bits() {
    let on = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(run_everything)
    };
    let one = on(1);
    let two = on(2);
    assert_eq!(one.len(), two.len());
    assert!(one == two, "results differ between 1 and 2 threads");
    // Guard against a vacuous pass: the run produced real, varied numbers.
    assert!(one.iter().filter(|&&b| b != 0).count() > one.len() / 2);
}
