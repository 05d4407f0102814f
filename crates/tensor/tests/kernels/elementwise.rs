//! Activations, softmax and bias kernels against their formulas in f64.

use ndarray::{Array1, Array2, Array4, Axis, array};
use proptest::prelude::*;
use tensor::{
    add_channel_bias, add_row_bias, channel_bias_grad, leaky_relu, leaky_relu_backward,
    log_softmax, log_softmax_backward, relu, relu_backward, relu_backward_from_signs,
    relu_keeping_signs, row_bias_grad, sigmoid, sigmoid_backward, sign_words, softmax,
    softmax_backward, tanh, tanh_backward,
};

use crate::reference::Values;

fn close(a: f32, b: f64, tol: f64) -> bool {
    (a as f64 - b).abs() <= tol * (1.0 + b.abs())
}

proptest! {
    #[test]
    fn activations_and_their_derivatives_match_the_formulas(rows in 1usize..6, cols in 1usize..6, seed in any::<u64>()) {
        let mut values = Values::new(seed);
        let x = values.array2((rows, cols)).mapv(|v| v * 8.0);
        let dy = values.array2((rows, cols));
        let mut dx = Array2::from_elem((rows, cols), f32::NAN);

        let mut y = x.clone();
        relu(y.view_mut());
        dx.assign(&dy);
        relu_backward(y.view(), dx.view_mut()).unwrap();
        for ((&x, &y), (&g, &d)) in x.iter().zip(&y).zip(dy.iter().zip(&dx)) {
            prop_assert_eq!(y, x.max(0.0));
            prop_assert_eq!(d, if x > 0.0 { g } else { 0.0 });
        }

        let mut y = x.clone();
        leaky_relu(y.view_mut(), 0.1);
        dx.assign(&dy);
        leaky_relu_backward(y.view(), dx.view_mut(), 0.1).unwrap();
        for ((&x, &y), (&g, &d)) in x.iter().zip(&y).zip(dy.iter().zip(&dx)) {
            prop_assert_eq!(y, if x > 0.0 { x } else { 0.1 * x });
            prop_assert_eq!(d, if x > 0.0 { g } else { 0.1 * g });
        }

        let mut y = x.clone();
        sigmoid(y.view_mut());
        dx.assign(&dy);
        sigmoid_backward(y.view(), dx.view_mut()).unwrap();
        for ((&x, &y), (&g, &d)) in x.iter().zip(&y).zip(dy.iter().zip(&dx)) {
            let s = 1.0 / (1.0 + (-(x as f64)).exp());
            prop_assert!(close(y, s, 1e-6));
            prop_assert!(close(d, g as f64 * s * (1.0 - s), 1e-5));
        }

        let mut y = x.clone();
        tanh(y.view_mut());
        dx.assign(&dy);
        tanh_backward(y.view(), dx.view_mut()).unwrap();
        for ((&x, &y), (&g, &d)) in x.iter().zip(&y).zip(dy.iter().zip(&dx)) {
            let t = (x as f64).tanh();
            prop_assert!(close(y, t, 1e-6));
            prop_assert!(close(d, g as f64 * (1.0 - t * t), 1e-5));
        }
    }

    #[test]
    fn a_relu_keeping_signs_gives_the_values_of_one_keeping_its_output(
        // Lengths around a word of signs and around the size that splits over threads, with
        // zeros, negative zeros and NaNs among the values.
        len in prop_oneof![0usize..200, 32_700usize..33_000, 70_000usize..70_100],
        seed in any::<u64>(),
    ) {
        let mut values = Values::new(seed);
        let special = [0.0f32, -0.0, f32::NAN];
        let x: Vec<f32> = (0..len)
            .map(|i| if i % 7 == 3 { special[i % 3] } else { values.next() * 8.0 })
            .collect();
        let dy: Vec<f32> = (0..len).map(|_| values.next()).collect();
        let mut y = ndarray::Array1::from(x.clone());
        relu(y.view_mut());
        let mut dx = ndarray::Array1::from(dy.clone());
        relu_backward(y.view(), dx.view_mut()).unwrap();

        let mut fast = x;
        let mut signs = vec![u64::MAX; sign_words(len)];
        relu_keeping_signs(&mut fast, &mut signs).unwrap();
        let mut fast_dx = dy;
        relu_backward_from_signs(&signs, &mut fast_dx).unwrap();
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&fast), bits(y.as_slice().unwrap()));
        prop_assert_eq!(bits(&fast_dx), bits(dx.as_slice().unwrap()));
        let mut short = vec![0u64; sign_words(len + 64) - 1 + usize::from(len == 0)];
        if short.len() != sign_words(len) {
            prop_assert!(relu_keeping_signs(&mut fast, &mut short).is_err());
            prop_assert!(relu_backward_from_signs(&short, &mut fast_dx).is_err());
        }
    }

    #[test]
    fn softmax_and_log_softmax_match_the_formulas_along_any_axis(
        shape in (1usize..5, 1usize..5, 1usize..5), axis in 0usize..3, seed in any::<u64>(),
    ) {
        let mut values = Values::new(seed);
        let x = ndarray::Array3::from_shape_simple_fn(shape, || values.next() * 20.0);
        let dy = ndarray::Array3::from_shape_simple_fn(shape, || values.next());
        let axis = Axis(axis);
        let mut p = x.clone();
        let mut logp = x.clone();
        softmax(x.view(), axis, p.view_mut()).unwrap();
        log_softmax(x.view(), axis, logp.view_mut()).unwrap();
        let mut dx_soft = x.clone();
        let mut dx_log = x.clone();
        softmax_backward(p.view(), dy.view(), axis, dx_soft.view_mut()).unwrap();
        log_softmax_backward(logp.view(), dy.view(), axis, dx_log.view_mut()).unwrap();
        for (((x, p), (logp, dy)), (dxs, dxl)) in x.lanes(axis).into_iter()
            .zip(p.lanes(axis)).zip(logp.lanes(axis).into_iter().zip(dy.lanes(axis)))
            .zip(dx_soft.lanes(axis).into_iter().zip(dx_log.lanes(axis)))
        {
            let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let max = x.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = x.iter().map(|v| (v - max).exp()).sum();
            let p_ref: Vec<f64> = x.iter().map(|v| (v - max).exp() / z).collect();
            let dot: f64 = p_ref.iter().zip(dy.iter()).map(|(p, &g)| p * g as f64).sum();
            let total: f64 = dy.iter().map(|&g| g as f64).sum();
            for i in 0..x.len() {
                prop_assert!((p[i] as f64 - p_ref[i]).abs() < 1e-6);
                prop_assert!(close(logp[i], x[i] - max - z.ln(), 1e-5));
                prop_assert!((dxs[i] as f64 - p_ref[i] * (dy[i] as f64 - dot)).abs() < 1e-5);
                prop_assert!((dxl[i] as f64 - (dy[i] as f64 - p_ref[i] * total)).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn softmax_stays_finite_for_huge_logits() {
    // By hand: shifted by the max 1001, the exponents are e^-1, e^0, e^-2001 ~ 0, so
    // p = [1/(1+e), e/(1+e), 0] = [0.26894142, 0.73105858, 0] and log p = [-1.3132617, -0.3132617, -2001.3132].
    let x = array![[1000.0f32, 1001.0, -1000.0]];
    let mut p = Array2::zeros((1, 3));
    let mut logp = Array2::zeros((1, 3));
    softmax(x.view(), Axis(1), p.view_mut()).unwrap();
    log_softmax(x.view(), Axis(1), logp.view_mut()).unwrap();
    assert!(
        p.iter().chain(logp.iter()).all(|v| v.is_finite()),
        "{p} {logp}"
    );
    assert!((p[(0, 0)] - 0.268_941_42).abs() < 1e-6 && (p[(0, 1)] - 0.731_058_6).abs() < 1e-6);
    assert_eq!(p[(0, 2)], 0.0);
    assert!((logp[(0, 0)] + 1.313_261_7).abs() < 1e-5);
    assert!((logp[(0, 2)] + 2001.3132).abs() < 1e-2);
}

#[test]
fn sigmoid_does_not_overflow() {
    let mut x = array![-1000.0f32, 1000.0, 0.0];
    sigmoid(x.view_mut());
    assert_eq!(x, array![0.0, 1.0, 0.5]);
}

#[test]
fn bias_add_and_its_gradient_sum_over_the_other_axes() {
    let mut values = Values::new(3);
    let x = values.array4([2, 3, 4, 5]);
    let bias = values.array1(3);
    let mut y = x.clone();
    add_channel_bias(y.view_mut(), bias.view()).unwrap();
    assert!(
        (&y - &x)
            .indexed_iter()
            .all(|((_, c, _, _), &d)| (d - bias[c]).abs() < 1e-6)
    );
    let mut db = Array1::ones(3);
    channel_bias_grad(x.view(), db.view_mut()).unwrap();
    for c in 0..3 {
        let expected = 1.0
            + x.index_axis(Axis(1), c)
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>();
        assert!((db[c] as f64 - expected).abs() < 1e-4);
    }

    let m = values.array2((4, 3));
    let mut m2 = m.clone();
    add_row_bias(m2.view_mut(), bias.view()).unwrap();
    assert!(
        (&m2 - &m)
            .indexed_iter()
            .all(|((_, f), &d)| (d - bias[f]).abs() < 1e-6)
    );
    let mut db = Array1::zeros(3);
    row_bias_grad(m.view(), db.view_mut()).unwrap();
    assert!((0..3).all(|f| (db[f] - m.column(f).sum()).abs() < 1e-5));

    let wrong = Array1::zeros(4);
    assert!(add_channel_bias(Array4::zeros((1, 3, 1, 1)).view_mut(), wrong.view()).is_err());
}

/// Arrays large enough to be split across threads give the bits of the same values done a row
/// at a time (rows too short to be split).
#[test]
fn activations_of_large_arrays_match_row_by_row() {
    let mut values = Values::new(7);
    let x = values.array2((200, 300)).mapv(|v| v * 8.0);
    let dy = values.array2((200, 300));
    type Forward = fn(ndarray::ArrayViewMut2<'_, f32>);
    type Backward = fn(ndarray::ArrayView2<'_, f32>, ndarray::ArrayViewMut2<'_, f32>);
    let cases: [(Forward, Backward); 4] = [
        (|x| relu(x), |y, g| relu_backward(y, g).unwrap()),
        (
            |x| leaky_relu(x, 0.1),
            |y, g| leaky_relu_backward(y, g, 0.1).unwrap(),
        ),
        (|x| sigmoid(x), |y, g| sigmoid_backward(y, g).unwrap()),
        (|x| tanh(x), |y, g| tanh_backward(y, g).unwrap()),
    ];
    for (forward, backward) in cases {
        let (mut y_all, mut g_all) = (x.clone(), dy.clone());
        forward(y_all.view_mut());
        backward(y_all.view(), g_all.view_mut());
        let (mut y_rows, mut g_rows) = (x.clone(), dy.clone());
        for r in 0..x.nrows() {
            forward(y_rows.slice_mut(ndarray::s![r..r + 1, ..]));
            backward(
                y_rows.slice(ndarray::s![r..r + 1, ..]),
                g_rows.slice_mut(ndarray::s![r..r + 1, ..]),
            );
        }
        assert_eq!(y_all.mapv(f32::to_bits), y_rows.mapv(f32::to_bits));
        assert_eq!(g_all.mapv(f32::to_bits), g_rows.mapv(f32::to_bits));
        assert_ne!(y_all, x, "the forward pass must change something");
    }
}

/// The distance from `y` to `reference` in units of the last place of `reference` as an f32.
fn ulps(y: f32, reference: f64) -> f64 {
    let r = reference as f32;
    let ulp = (f32::from_bits(r.abs().to_bits() + 1) - r.abs()) as f64;
    (y as f64 - reference).abs() / ulp
}

#[test]
fn tanh_and_sigmoid_are_within_a_few_ulps_and_keep_the_special_values() {
    // A fine sweep of [-20, 20] (both sides of tanh's 0.625 switch, both signs of sigmoid),
    // tiny values, and where the exponential's clamp starts; each within 2.5 ulps of f64 (the
    // worst measured: tanh 1.49, sigmoid 2.16, whose two roundings after e^-x add up), and the
    // same bits whether the values are contiguous or strided.
    let mut xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 1e-4).collect();
    xs.extend([
        1e-30f32,
        -1e-30,
        1e-7,
        0.625,
        -0.625,
        0.624_999_9,
        43.5,
        -43.5,
        -87.5,
        90.0,
    ]);
    let mut y = ndarray::Array1::from(xs.clone());
    let mut s = y.clone();
    tanh(y.view_mut());
    sigmoid(s.view_mut());
    let mut worst = (0.0f64, 0.0f64);
    for ((&x, &t), &g) in xs.iter().zip(&y).zip(&s) {
        let x64 = f64::from(x);
        worst.0 = worst.0.max(ulps(t, x64.tanh()));
        let logistic = 1.0 / (1.0 + (-x64).exp());
        // Below e^-87 the exponential is 0: an absolute error under 2^-125.
        if logistic > 1e-37 {
            worst.1 = worst.1.max(ulps(g, logistic));
        } else {
            assert!(g.abs() < 1e-37, "sigmoid({x}) = {g}");
        }
    }
    assert!(
        worst.0 <= 2.5 && worst.1 <= 2.5,
        "worst ulps: tanh {}, sigmoid {}",
        worst.0,
        worst.1
    );

    let mut strided = ndarray::Array2::from_shape_fn((xs.len(), 2), |(i, _)| xs[i]);
    let mut column = strided.column_mut(0);
    tanh(column.view_mut());
    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&column.to_vec()), bits(y.as_slice().unwrap()));

    let special = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0];
    let mut t = ndarray::Array1::from(special.to_vec());
    let mut g = t.clone();
    tanh(t.view_mut());
    sigmoid(g.view_mut());
    assert_eq!(&t.to_vec()[..2], &[1.0, -1.0]);
    assert_eq!(&g.to_vec()[..2], &[1.0, 0.0]);
    assert!(t[2].is_nan() && g[2].is_nan());
    assert_eq!(
        (t[3].to_bits(), t[4].to_bits()),
        (0.0f32.to_bits(), (-0.0f32).to_bits())
    );
    assert_eq!((g[3], g[4]), (0.5, 0.5));
}
