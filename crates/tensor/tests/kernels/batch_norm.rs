//! Batch normalization's kernels against its formulas in f64.

use ndarray::{Array1, Array3};
use proptest::prelude::*;
use tensor::{batch_norm_backward, batch_norm_forward, channel_mean_var, scale_channels};

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
        let mut y = Array3::from_elem((n, c, s), f32::NAN);
        batch_norm_forward(x.view(), y.view_mut(), mean32.view(), inv_std.view(), gamma.view(), beta.view()).unwrap();

        let mut dx = dy.clone();
        let mut dgamma = Array1::from_elem(c, 0.5f32);
        let mut dbeta = Array1::from_elem(c, -0.5f32);
        batch_norm_backward(
            dx.view_mut(), x.view(), mean32.view(), inv_std.view(), gamma.view(),
            dgamma.view_mut(), dbeta.view_mut(), true,
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
            kept.view_mut(), x.view(), mean32.view(), inv_std.view(), gamma.view(),
            dgamma2.view_mut(), dbeta2.view_mut(), false,
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
    let error = batch_norm_forward(
        x.view(),
        y.view_mut(),
        three.view(),
        three.view(),
        three.view(),
        three.view(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("output"), "{error}");
    let mut y = Array3::<f32>::zeros((2, 3, 4));
    let error = batch_norm_forward(
        x.view(),
        y.view_mut(),
        three.view(),
        two.view(),
        three.view(),
        three.view(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("inv_std"), "{error}");
    let transposed = x.view().reversed_axes();
    assert!(channel_mean_var(transposed).is_err());
}
