//! Pooling against nested-loop references.

use ndarray::{Array2, Array4};
use proptest::prelude::*;
use tensor::{
    Pool2dDims, avg_pool2d_backward, avg_pool2d_forward, global_avg_pool_backward,
    global_avg_pool_forward, max_pool2d_backward, max_pool2d_forward,
};

use crate::reference::Values;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn pooling_matches_the_reference(
        input in (1usize..4, 1usize..4, 1usize..10, 1usize..10),
        kernel in (1usize..4, 1usize..4),
        stride in (1usize..4, 1usize..4),
        seed in any::<u64>(),
    ) {
        let (n, c, h, w) = input;
        prop_assume!(kernel.0 <= h && kernel.1 <= w);
        let dims = Pool2dDims::new([n, c, h, w], [kernel.0, kernel.1], [stride.0, stride.1]).unwrap();
        let mut values = Values::new(seed);
        let x = values.array4([n, c, h, w]);
        let dy = values.array4(dims.output_shape());
        let (oh, ow) = (dims.out_h(), dims.out_w());
        let area = (kernel.0 * kernel.1) as f64;

        // Reference forward and backward in f64.
        let mut max_ref = Array4::<f64>::zeros(dims.output_shape());
        let mut avg_ref = Array4::<f64>::zeros(dims.output_shape());
        let mut max_dx_ref = Array4::<f64>::zeros(dims.input_shape());
        let mut avg_dx_ref = Array4::<f64>::zeros(dims.input_shape());
        for (b, ch, i, j) in itertools(n, c, oh, ow) {
            let window: Vec<(usize, usize)> = (0..kernel.0)
                .flat_map(|p| (0..kernel.1).map(move |q| (i * stride.0 + p, j * stride.1 + q)))
                .collect();
            // First maximum in scan order.
            let &(mi, mj) = window.iter().fold(&window[0], |best, at| {
                if x[(b, ch, at.0, at.1)] > x[(b, ch, best.0, best.1)] { at } else { best }
            });
            max_ref[(b, ch, i, j)] = x[(b, ch, mi, mj)] as f64;
            max_dx_ref[(b, ch, mi, mj)] += dy[(b, ch, i, j)] as f64;
            avg_ref[(b, ch, i, j)] = window.iter().map(|&(p, q)| x[(b, ch, p, q)] as f64).sum::<f64>() / area;
            for &(p, q) in &window {
                avg_dx_ref[(b, ch, p, q)] += dy[(b, ch, i, j)] as f64 / area;
            }
        }

        let mut y = Array4::from_elem(dims.output_shape(), f32::NAN);
        let mut argmax = Array4::zeros(dims.output_shape());
        max_pool2d_forward(&dims, x.view(), y.view_mut(), argmax.view_mut()).unwrap();
        prop_assert_eq!(y.mapv(f64::from), &max_ref);
        // The same values stored column-major within each plane give the same answer.
        let x_strided = x.clone().permuted_axes([0, 1, 3, 2]).as_standard_layout().into_owned();
        let x_strided = x_strided.permuted_axes([0, 1, 3, 2]);
        prop_assert!(!x_strided.is_standard_layout() || h == 1 || w == 1);
        let mut y_strided = Array4::from_elem(dims.output_shape(), f32::NAN);
        let mut argmax_strided = Array4::zeros(dims.output_shape());
        max_pool2d_forward(&dims, x_strided.view(), y_strided.view_mut(), argmax_strided.view_mut()).unwrap();
        prop_assert_eq!(&y_strided, &y);
        prop_assert_eq!(&argmax_strided, &argmax);
        let mut dx = Array4::from_elem(dims.input_shape(), f32::NAN);
        max_pool2d_backward(&dims, dy.view(), argmax.view(), dx.view_mut()).unwrap();
        for (a, b) in dx.iter().zip(max_dx_ref.iter()) {
            prop_assert!((*a as f64 - b).abs() < 1e-5, "max dx {} vs {}", a, b);
        }

        avg_pool2d_forward(&dims, x.view(), y.view_mut()).unwrap();
        for (a, b) in y.iter().zip(avg_ref.iter()) {
            prop_assert!((*a as f64 - b).abs() < 1e-5, "avg y {} vs {}", a, b);
        }
        avg_pool2d_backward(&dims, dy.view(), dx.view_mut()).unwrap();
        for (a, b) in dx.iter().zip(avg_dx_ref.iter()) {
            prop_assert!((*a as f64 - b).abs() < 1e-5, "avg dx {} vs {}", a, b);
        }

        // Global average pooling: the mean of each plane, and its gradient spread evenly.
        let mut g = Array2::from_elem((n, c), f32::NAN);
        global_avg_pool_forward(x.view(), g.view_mut()).unwrap();
        let gdy = values.array2((n, c));
        let mut gdx = Array4::from_elem((n, c, h, w), f32::NAN);
        global_avg_pool_backward(gdy.view(), gdx.view_mut()).unwrap();
        for b in 0..n {
            for ch in 0..c {
                let plane = x.slice(ndarray::s![b, ch, .., ..]);
                let mean = plane.iter().map(|&v| v as f64).sum::<f64>() / (h * w) as f64;
                prop_assert!((g[(b, ch)] as f64 - mean).abs() < 1e-5);
                let share = gdy[(b, ch)] / (h * w) as f32;
                prop_assert!(gdx.slice(ndarray::s![b, ch, .., ..]).iter().all(|&v| (v - share).abs() < 1e-6));
            }
        }
    }
}

fn itertools(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    (0..n).flat_map(move |b| {
        (0..c).flat_map(move |ch| (0..h).flat_map(move |i| (0..w).map(move |j| (b, ch, i, j))))
    })
}

#[test]
fn a_hand_computed_max_pool() {
    // 4x4 input 0..16 (row-major), 2x2 windows, stride 2: maxima are the bottom-right of each
    // window: 5, 7, 13, 15, at plane positions 5, 7, 13, 15.
    let dims = Pool2dDims::new([1, 1, 4, 4], [2, 2], [2, 2]).unwrap();
    let x = Array4::from_shape_vec((1, 1, 4, 4), (0..16).map(|v| v as f32).collect()).unwrap();
    let mut y = Array4::zeros((1, 1, 2, 2));
    let mut argmax = Array4::zeros((1, 1, 2, 2));
    max_pool2d_forward(&dims, x.view(), y.view_mut(), argmax.view_mut()).unwrap();
    assert_eq!(
        y.iter().copied().collect::<Vec<_>>(),
        vec![5.0, 7.0, 13.0, 15.0]
    );
    assert_eq!(
        argmax.iter().copied().collect::<Vec<_>>(),
        vec![5, 7, 13, 15]
    );
}

#[test]
fn max_pool_propagates_nan_like_pytorch() {
    let dims = Pool2dDims::new([1, 1, 2, 2], [2, 2], [2, 2]).unwrap();
    let x = Array4::from_shape_vec((1, 1, 2, 2), vec![1.0, f32::NAN, 3.0, 2.0]).unwrap();
    let mut y = Array4::zeros((1, 1, 1, 1));
    let mut argmax = Array4::zeros((1, 1, 1, 1));
    max_pool2d_forward(&dims, x.view(), y.view_mut(), argmax.view_mut()).unwrap();
    assert!(y[(0, 0, 0, 0)].is_nan());
    assert_eq!(argmax[(0, 0, 0, 0)], 1);
}
