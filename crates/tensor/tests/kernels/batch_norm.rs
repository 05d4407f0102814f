//! Batch normalization's kernels against its formulas in f64.

use ndarray::{Array1, Array3, Array4};
use proptest::prelude::*;
use tensor::{
    ChannelNormalization, Pool2dDims, batch_norm_backward, batch_norm_forward,
    batch_norm_relu_max_pool_backward, batch_norm_relu_max_pool_forward, channel_mean_var,
    max_pool2d_backward, max_pool2d_forward, relu, relu_backward, scale_channels,
};

use crate::reference::Values;

/// `[N, C, S]` values with a per-channel offset, so a mean far from zero is tested.
fn values_ncs(values: &mut Values, shape: (usize, usize, usize), offset: f32) -> Array3<f32> {
    let mut x = Array3::from_shape_simple_fn(shape, || values.next());
    for (c, mut lane) in x.axis_iter_mut(ndarray::Axis(1)).enumerate() {
        lane += offset * c as f32;
    }
    x
}

/// Mean and biased variance per channel, two passes in f64.
fn reference_stats(x: &Array3<f32>) -> (Vec<f64>, Vec<f64>) {
    let (n, c, s) = x.dim();
    let count = (n * s) as f64;
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    for k in 0..c {
        let lane = x.index_axis(ndarray::Axis(1), k);
        mean[k] = lane.iter().map(|&v| f64::from(v)).sum::<f64>() / count;
        var[k] = lane
            .iter()
            .map(|&v| (f64::from(v) - mean[k]).powi(2))
            .sum::<f64>()
            / count;
    }
    (mean, var)
}

proptest! {
    #[test]
    fn batch_norm_matches_its_formulas(
        n in 1usize..5, c in 1usize..6, s in 1usize..40, offset in -50.0f32..50.0,
        seed in any::<u64>(),
    ) {
        prop_assume!(n * s >= 2);
        let mut values = Values::new(seed);
        let x = values_ncs(&mut values, (n, c, s), offset);
        let dy = Array3::from_shape_simple_fn((n, c, s), || values.next());
        let gamma = values.array1(c);
        let beta = values.array1(c);
        let eps = 1e-5f64;

        let (mean, var) = channel_mean_var(x.view()).unwrap();
        let (ref_mean, ref_var) = reference_stats(&x);
        for k in 0..c {
            prop_assert!((mean[k] - ref_mean[k]).abs() <= 1e-9 * (1.0 + ref_mean[k].abs()));
            prop_assert!((var[k] - ref_var[k]).abs() <= 1e-6 * (1.0 + ref_mean[k].powi(2)));
        }

        let mean32 = Array1::from_iter(ref_mean.iter().map(|&m| m as f32));
        let inv_std = Array1::from_iter(ref_var.iter().map(|&v| (1.0 / (v + eps).sqrt()) as f32));
        let normalization = ChannelNormalization {
            mean: mean32.view(), inv_std: inv_std.view(), gamma: gamma.view(), beta: beta.view(),
        };
        let mut y = Array3::from_elem((n, c, s), f32::NAN);
        batch_norm_forward(x.view(), y.view_mut(), normalization, false).unwrap();

        let mut dx = dy.clone();
        let mut dgamma = Array1::from_elem(c, 0.5f32);
        let mut dbeta = Array1::from_elem(c, -0.5f32);
        batch_norm_backward(
            dx.view_mut(), x.view(), normalization, false, dgamma.view_mut(), dbeta.view_mut(), true,
        ).unwrap();

        let count = (n * s) as f64;
        for k in 0..c {
            let is = 1.0 / (ref_var[k] + eps).sqrt();
            let (g, b) = (f64::from(gamma[k]), f64::from(beta[k]));
            let x_hat = |i: usize, p: usize| (f64::from(x[[i, k, p]]) - ref_mean[k]) * is;
            let mut sum_dy = 0.0;
            let mut sum_dy_xhat = 0.0;
            for i in 0..n {
                for p in 0..s {
                    let want = g * x_hat(i, p) + b;
                    // x_hat is at most sqrt(count) in size; the f32 subtraction of a mean of
                    // size |offset| * c loses up to its ulp, times inv_std.
                    let tolerance = 1e-5 * (1.0 + want.abs()) + 1e-6 * is * (1.0 + ref_mean[k].abs());
                    prop_assert!((f64::from(y[[i, k, p]]) - want).abs() <= tolerance,
                        "y[{i},{k},{p}] = {}, want {want}", y[[i, k, p]]);
                    sum_dy += f64::from(dy[[i, k, p]]);
                    sum_dy_xhat += f64::from(dy[[i, k, p]]) * x_hat(i, p);
                }
            }
            let scale = g * is;
            let gradient_tolerance = 1e-4 * (1.0 + count) * (1.0 + ref_mean[k].abs() * is);
            prop_assert!((f64::from(dgamma[k]) - (0.5 + sum_dy_xhat)).abs() <= gradient_tolerance);
            prop_assert!((f64::from(dbeta[k]) - (-0.5 + sum_dy)).abs() <= 1e-4 * (1.0 + count));
            for i in 0..n {
                for p in 0..s {
                    let want = scale
                        * (f64::from(dy[[i, k, p]]) - sum_dy / count - x_hat(i, p) * sum_dy_xhat / count);
                    let tolerance = 1e-4 * (1.0 + scale.abs()) * (1.0 + ref_mean[k].abs() * is);
                    prop_assert!((f64::from(dx[[i, k, p]]) - want).abs() <= tolerance,
                        "dx[{i},{k},{p}] = {}, want {want}", dx[[i, k, p]]);
                }
            }
        }

        // Evaluation: one scale and shift per channel.
        let scale = values.array1(c);
        let shift = values.array1(c);
        let mut z = x.clone();
        scale_channels(z.view_mut(), scale.view(), shift.view()).unwrap();
        for ((i, k, p), &v) in z.indexed_iter() {
            let want = f64::from(scale[k]) * f64::from(x[[i, k, p]]) + f64::from(shift[k]);
            prop_assert!((f64::from(v) - want).abs() <= 1e-6 * (1.0 + want.abs() + f64::from(x[[i, k, p]]).abs()));
        }

        // Without the input gradient: the parameter gradients alone, the output gradient kept.
        let mut kept = dy.clone();
        let (mut dgamma2, mut dbeta2) = (Array1::from_elem(c, 0.5f32), Array1::from_elem(c, -0.5f32));
        batch_norm_backward(
            kept.view_mut(), x.view(), normalization, false, dgamma2.view_mut(), dbeta2.view_mut(), false,
        ).unwrap();
        prop_assert_eq!(&kept, &dy);
        prop_assert_eq!(&dgamma2, &dgamma);
        prop_assert_eq!(&dbeta2, &dbeta);
    }
}

#[test]
fn batch_norm_refuses_mismatched_operands() {
    let x = Array3::<f32>::zeros((2, 3, 4));
    let mut y = Array3::<f32>::zeros((2, 3, 5));
    let three = Array1::<f32>::ones(3);
    let two = Array1::<f32>::ones(2);
    let fits = ChannelNormalization {
        mean: three.view(),
        inv_std: three.view(),
        gamma: three.view(),
        beta: three.view(),
    };
    let error = batch_norm_forward(x.view(), y.view_mut(), fits, false)
        .unwrap_err()
        .to_string();
    assert!(error.contains("output"), "{error}");
    let mut y = Array3::<f32>::zeros((2, 3, 4));
    let short = ChannelNormalization {
        inv_std: two.view(),
        ..fits
    };
    let error = batch_norm_forward(x.view(), y.view_mut(), short, false)
        .unwrap_err()
        .to_string();
    assert!(error.contains("inv_std"), "{error}");
    let transposed = x.view().reversed_axes();
    assert!(channel_mean_var(transposed).is_err());
}

proptest! {
    /// The fused passes give the bits of the layers run one by one: BatchNorm (with its ReLU,
    /// or then ReLU) and max pooling, forward and backward.
    #[test]
    fn fused_relu_and_pooling_give_the_bits_of_the_separate_kernels(
        n in 1usize..4, c in 1usize..5, h in 2usize..12, w in 2usize..12,
        kernel in 1usize..4, stride in 1usize..4, seed in any::<u64>(),
    ) {
        prop_assume!(kernel <= h && kernel <= w);
        let mut values = Values::new(seed);
        let x = Array4::from_shape_simple_fn((n, c, h, w), || values.next());
        let (gamma, beta) = (values.array1(c), values.array1(c));
        let mean = values.array1(c).mapv(|v| v * 0.1);
        let inv_std = values.array1(c).mapv(|v| 1.0 + v.abs());
        let normalization = ChannelNormalization {
            mean: mean.view(), inv_std: inv_std.view(), gamma: gamma.view(), beta: beta.view(),
        };
        let x3 = x.view().into_shape_with_order((n, c, h * w)).unwrap();
        let bits = |a: &[f32]| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();

        // Separate: normalize, ReLU, pool.
        let mut z = Array3::zeros((n, c, h * w));
        batch_norm_forward(x3, z.view_mut(), normalization, false).unwrap();
        let mut activated = z.clone();
        relu(activated.view_mut());
        let mut fused_relu = Array3::zeros((n, c, h * w));
        batch_norm_forward(x3, fused_relu.view_mut(), normalization, true).unwrap();
        prop_assert_eq!(bits(activated.as_slice().unwrap()), bits(fused_relu.as_slice().unwrap()));

        let pool = Pool2dDims::new([n, c, h, w], [kernel, kernel], [stride, stride]).unwrap();
        let activated4 = activated.clone().into_shape_with_order((n, c, h, w)).unwrap();
        let mut pooled = Array4::zeros(pool.output_shape());
        let mut argmax = Array4::zeros(pool.output_shape());
        max_pool2d_forward(&pool, activated4.view(), pooled.view_mut(), argmax.view_mut()).unwrap();
        let mut fused = Array4::from_elem(pool.output_shape(), f32::NAN);
        let mut fused_argmax = Array4::zeros(pool.output_shape());
        batch_norm_relu_max_pool_forward(x.view(), &pool, normalization, fused.view_mut(), Some(fused_argmax.view_mut())).unwrap();
        prop_assert_eq!(bits(pooled.as_slice().unwrap()), bits(fused.as_slice().unwrap()));
        let mut inference = Array4::from_elem(pool.output_shape(), f32::NAN);
        batch_norm_relu_max_pool_forward(x.view(), &pool, normalization, inference.view_mut(), None).unwrap();
        prop_assert_eq!(bits(pooled.as_slice().unwrap()), bits(inference.as_slice().unwrap()));

        // Backward, separate: unpool, ReLU, BatchNorm.
        let dy = Array4::from_shape_simple_fn(pool.output_shape(), || values.next());
        let mut d_activated = Array4::zeros((n, c, h, w));
        max_pool2d_backward(&pool, dy.view(), argmax.view(), d_activated.view_mut()).unwrap();
        relu_backward(activated4.view(), d_activated.view_mut()).unwrap();
        let mut dx = d_activated.into_shape_with_order((n, c, h * w)).unwrap();
        let (mut dgamma, mut dbeta) = (Array1::zeros(c), Array1::zeros(c));
        batch_norm_backward(dx.view_mut(), x3, normalization, false, dgamma.view_mut(), dbeta.view_mut(), true).unwrap();

        // The fused pass turns the input into its gradient in place; without an input
        // gradient, it leaves the input as it was.
        let mut fused_dx = x.clone();
        let (mut fused_dgamma, mut fused_dbeta) = (Array1::zeros(c), Array1::zeros(c));
        batch_norm_relu_max_pool_backward(
            dy.view(), fused_argmax.view(), &pool, fused_dx.view_mut(), normalization,
            fused_dgamma.view_mut(), fused_dbeta.view_mut(), true,
        ).unwrap();
        prop_assert_eq!(bits(dx.as_slice().unwrap()), bits(fused_dx.as_slice().unwrap()));
        prop_assert_eq!(bits(dgamma.as_slice().unwrap()), bits(fused_dgamma.as_slice().unwrap()));
        prop_assert_eq!(bits(dbeta.as_slice().unwrap()), bits(fused_dbeta.as_slice().unwrap()));
        let mut kept = x.clone();
        let (mut kept_dgamma, mut kept_dbeta) = (Array1::zeros(c), Array1::zeros(c));
        batch_norm_relu_max_pool_backward(
            dy.view(), fused_argmax.view(), &pool, kept.view_mut(), normalization,
            kept_dgamma.view_mut(), kept_dbeta.view_mut(), false,
        ).unwrap();
        prop_assert_eq!(bits(x.as_slice().unwrap()), bits(kept.as_slice().unwrap()));
        prop_assert_eq!(bits(dgamma.as_slice().unwrap()), bits(kept_dgamma.as_slice().unwrap()));

        // BatchNorm with its ReLU, backward, against BatchNorm then the ReLU's backward.
        let dz = Array3::from_shape_simple_fn((n, c, h * w), || values.next());
        let mut separate = dz.clone();
        relu_backward(activated.view(), separate.view_mut()).unwrap();
        let (mut g1, mut b1) = (Array1::zeros(c), Array1::zeros(c));
        batch_norm_backward(separate.view_mut(), x3, normalization, false, g1.view_mut(), b1.view_mut(), true).unwrap();
        let mut together = dz.clone();
        let (mut g2, mut b2) = (Array1::zeros(c), Array1::zeros(c));
        batch_norm_backward(together.view_mut(), x3, normalization, true, g2.view_mut(), b2.view_mut(), true).unwrap();
        prop_assert_eq!(bits(separate.as_slice().unwrap()), bits(together.as_slice().unwrap()));
        prop_assert_eq!(bits(g1.as_slice().unwrap()), bits(g2.as_slice().unwrap()));
        prop_assert_eq!(bits(b1.as_slice().unwrap()), bits(b2.as_slice().unwrap()));
    }
}
