//! The fused convolution + ReLU (or nothing) + max pooling against the kernels run in turn: the
//! same bits forward and backward, which is what lets a model use either.

use ndarray::Array4;
use proptest::prelude::*;
use tensor::{
    Backward, BeforePool, Conv2dBuffers, Conv2dDims, Conv2dGrads, NO_GRADIENT, Padding, Pool2dDims,
    conv2d_backward, conv2d_forward, conv2d_max_pool_backward, conv2d_max_pool_forward,
    max_pool2d_backward, max_pool2d_forward, relu, relu_backward,
};

use crate::reference::Values;

/// The bits of an array, so that comparisons tell 0.0 from -0.0 and NaN from NaN.
fn bits(a: &Array4<f32>) -> Array4<u32> {
    a.mapv(f32::to_bits)
}

#[allow(clippy::too_many_arguments)]
fn check_fused_matches_unfused(
    input: (usize, usize, usize, usize),
    out_channels: usize,
    kernel: usize,
    padding: Padding,
    pool: (usize, usize),
    before: BeforePool,
    bias_shift: Option<f32>,
    input_grad: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    let (n, c, h, w) = input;
    let Ok(dims) = Conv2dDims::new([n, c, h, w], out_channels, [kernel; 2], [1, 1], padding) else {
        return Ok(());
    };
    let Ok(pool) = Pool2dDims::new(dims.output_shape(), [pool.0; 2], [pool.1; 2]) else {
        return Ok(());
    };
    let mut values = Values::new(seed);
    let x = values.array4(dims.input_shape());
    let weight = values.array4(dims.weight_shape());
    // A bias shifted down blocks more windows behind a ReLU.
    let bias = values.array1(out_channels) + bias_shift.unwrap_or(0.0);
    let bias = bias_shift.map(|_| bias.view());
    let dy = values.array4(pool.output_shape());

    // Unfused: convolution, ReLU (if asked), max pooling; then their backward passes in
    // reverse.
    let mut buffers = Conv2dBuffers::default();
    let mut conv = Array4::from_elem(dims.output_shape(), f32::NAN);
    let (x, w) = (x.view(), weight.view());
    conv2d_forward(
        &dims,
        x,
        w,
        bias,
        &mut buffers,
        Backward::Needed,
        conv.view_mut(),
    )
    .unwrap();
    let relu_first = before == BeforePool::Relu;
    if relu_first {
        relu(conv.view_mut());
    }
    let mut y = Array4::from_elem(pool.output_shape(), f32::NAN);
    let mut argmax = Array4::zeros(pool.output_shape());
    max_pool2d_forward(&pool, conv.view(), y.view_mut(), argmax.view_mut()).unwrap();
    let mut dconv = Array4::from_elem(dims.output_shape(), f32::NAN);
    max_pool2d_backward(&pool, dy.view(), argmax.view(), dconv.view_mut()).unwrap();
    if relu_first {
        relu_backward(conv.view(), dconv.view_mut()).unwrap();
    }
    let (mut dw, mut db) = (
        Array4::zeros(dims.weight_shape()),
        ndarray::Array1::zeros(out_channels),
    );
    let mut dx = Array4::from_elem(dims.input_shape(), f32::NAN);
    let grads = Conv2dGrads {
        weight: dw.view_mut(),
        bias: Some(db.view_mut()),
        input: input_grad.then(|| dx.view_mut()),
    };
    conv2d_backward(&dims, w, dconv.view(), &mut buffers, grads).unwrap();

    // Fused, with fresh buffers.
    let mut buffers = Conv2dBuffers::default();
    let mut fused_y = Array4::from_elem(pool.output_shape(), f32::NAN);
    let mut fused_argmax = Array4::zeros(pool.output_shape());
    conv2d_max_pool_forward(
        &dims,
        &pool,
        before,
        x,
        w,
        bias,
        &mut buffers,
        Backward::Needed,
        fused_y.view_mut(),
        Some(fused_argmax.view_mut()),
    )
    .unwrap();
    prop_assert_eq!(bits(&fused_y), bits(&y));
    for ((&a, &fa), &v) in argmax.iter().zip(&fused_argmax).zip(&y) {
        let blocked = relu_first && v <= 0.0;
        prop_assert_eq!(fa, if blocked { NO_GRADIENT } else { a });
    }
    let (mut fused_dw, mut fused_db) = (
        Array4::zeros(dims.weight_shape()),
        ndarray::Array1::zeros(out_channels),
    );
    let mut fused_dx = Array4::from_elem(dims.input_shape(), f32::NAN);
    let grads = Conv2dGrads {
        weight: fused_dw.view_mut(),
        bias: Some(fused_db.view_mut()),
        input: input_grad.then(|| fused_dx.view_mut()),
    };
    let (dy, a) = (dy.view(), fused_argmax.view());
    conv2d_max_pool_backward(&dims, &pool, w, dy, a, &mut buffers, grads).unwrap();
    prop_assert_eq!(bits(&fused_dw), bits(&dw));
    prop_assert_eq!(fused_db.mapv(f32::to_bits), db.mapv(f32::to_bits));
    prop_assert_eq!(bits(&fused_dx), bits(&dx));

    // Inference, without an argmax, gives the same output and keeps nothing for a backward
    // pass.
    let mut buffers = Conv2dBuffers::default();
    let mut eval_y = Array4::from_elem(pool.output_shape(), f32::NAN);
    conv2d_max_pool_forward(
        &dims,
        &pool,
        before,
        x,
        w,
        bias,
        &mut buffers,
        Backward::NotNeeded,
        eval_y.view_mut(),
        None,
    )
    .unwrap();
    prop_assert_eq!(bits(&eval_y), bits(&y));
    let grads = Conv2dGrads {
        weight: fused_dw.view_mut(),
        bias: None,
        input: None,
    };
    prop_assert!(conv2d_max_pool_backward(&dims, &pool, w, dy, a, &mut buffers, grads).is_err());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(120))]

    #[test]
    fn fused_conv_relu_pool_gives_the_bits_of_the_three_kernels(
        // Up to 19 images of up to 20x20: both the gathered (small) and per-image paths.
        // Few channels are computed directly, many by im2col + GEMM (for kernels over 1x1),
        // or by the implicit GEMM into 16 or 64 output channels.
        input in (1usize..20, prop_oneof![1usize..4, 12usize..16], 2usize..21, 2usize..21),
        out_channels in prop_oneof![1usize..5, Just(16), Just(64)],
        kernel in 1usize..4,
        padding in prop_oneof![Just(Padding::Valid), Just(Padding::Same)],
        // Overlapping and non-overlapping windows.
        pool in (1usize..4, 1usize..4),
        before in prop_oneof![Just(BeforePool::Relu), Just(BeforePool::Nothing)],
        with_bias in any::<bool>(),
        input_grad in any::<bool>(),
        seed in any::<u64>(),
    ) {
        check_fused_matches_unfused(input, out_channels, kernel, padding, pool, before, with_bias.then_some(0.0), input_grad, seed)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn fused_implicit_gemm_with_2x2_pooling_gives_the_bits_of_the_three_kernels(
        // The implicit GEMM (receptive fields over 32 values, output channels in blocks of
        // 16) pools 2x2 windows moved by 2 channels last, before transposing.
        input in (1usize..12, 9usize..14, 4usize..16, 4usize..16),
        out_channels in prop_oneof![Just(16usize), Just(32), Just(64)],
        kernel in 2usize..4,
        padding in prop_oneof![Just(Padding::Valid), Just(Padding::Same)],
        before in prop_oneof![Just(BeforePool::Relu), Just(BeforePool::Nothing)],
        with_bias in any::<bool>(),
        input_grad in any::<bool>(),
        seed in any::<u64>(),
    ) {
        check_fused_matches_unfused(input, out_channels, kernel, padding, (2, 2), before, with_bias.then_some(0.0), input_grad, seed)?;
    }
}

#[test]
fn fused_shapes_that_do_not_fit_are_errors() {
    let dims = Conv2dDims::new([2, 1, 8, 8], 3, [3, 3], [1, 1], Padding::Valid).unwrap();
    let wrong_pool = Pool2dDims::new([2, 3, 8, 8], [2, 2], [2, 2]).unwrap();
    let pool = Pool2dDims::new(dims.output_shape(), [2, 2], [2, 2]).unwrap();
    let (x, w) = (
        Array4::zeros(dims.input_shape()),
        Array4::zeros(dims.weight_shape()),
    );
    let mut buffers = Conv2dBuffers::default();
    let mut y = Array4::zeros(pool.output_shape());
    let mut argmax = Array4::zeros(pool.output_shape());
    let forward = |pool: &Pool2dDims,
                   buffers: &mut Conv2dBuffers,
                   y: &mut Array4<f32>,
                   argmax: &mut Array4<u32>| {
        conv2d_max_pool_forward(
            &dims,
            pool,
            BeforePool::Relu,
            x.view(),
            w.view(),
            None,
            buffers,
            Backward::Needed,
            y.view_mut(),
            Some(argmax.view_mut()),
        )
    };
    assert!(forward(&wrong_pool, &mut buffers, &mut y, &mut argmax).is_err());
    forward(&pool, &mut buffers, &mut y, &mut argmax).unwrap();
    // An argmax outside the 6x6 convolution output is refused, not followed.
    argmax[(0, 0, 0, 0)] = 36;
    let mut dw = Array4::zeros(dims.weight_shape());
    let grads = Conv2dGrads {
        weight: dw.view_mut(),
        bias: None,
        input: None,
    };
    let dy = Array4::ones(pool.output_shape());
    let result = conv2d_max_pool_backward(
        &dims,
        &pool,
        w.view(),
        dy.view(),
        argmax.view(),
        &mut buffers,
        grads,
    );
    assert!(
        matches!(result, Err(tensor::TensorError::Shape { .. })),
        "{result:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fused_first_layer_under_2x2_pooling_gives_the_bits_of_the_three_kernels(
        // A first layer (one input channel, 3x3 or 5x5, no input gradient) under 2x2 pooling,
        // whose weight gradient is read at the maxima alone: with fewer output channels than
        // taps (planes in the padded width) and more (the image unfolded), odd and even sizes.
        input in (1usize..20, Just(1usize), 3usize..32, 3usize..32),
        kernel in prop_oneof![Just(3usize), Just(5usize)],
        out_channels in prop_oneof![1usize..9, 9usize..40],
        padding in prop_oneof![Just(Padding::Valid), Just(Padding::Same)],
        before in prop_oneof![Just(BeforePool::Relu), Just(BeforePool::Nothing)],
        // Behind a ReLU, the maximum of four values is positive in 15 windows of 16: a bias
        // shifted down blocks half of them, as a trained first layer's background does
        // (and as the weight gradient from the maxima needs, to be taken).
        bias_shift in prop_oneof![Just(None), Just(Some(0.0)), (-2.0f32..-0.5).prop_map(Some)],
        seed in any::<u64>(),
    ) {
        check_fused_matches_unfused(input, out_channels, kernel, padding, (2, 2), before, bias_shift, false, seed)?;
    }
}

#[test]
fn an_argmax_outside_its_window_is_followed_as_pooling_follows_it() {
    // The forward pass makes each argmax in its own window; one elsewhere in the plane (a
    // caller's) is still followed, as max_pool2d_backward follows it, and two windows with
    // one argmax add up there. (A faster unpooling, or a weight gradient read at the maxima
    // in their pixel order, that assumed windows own their argmax must keep this.) With 4
    // output channels the first layer's planes are in the padded width, with 16 (3x3) or 32
    // (5x5) unfolded.
    for (kernel, out_channels) in [(3, 4), (3, 16), (5, 4), (5, 32)] {
        // Window (0, 0) of channel 1 points at pixel (0, 5) of the 6x6 output, in window
        // (0, 2); at (4, 1), two pooled rows down; or at window (1, 1)'s own maximum.
        for (moved_to, expected) in [(5, (0, 5)), (4 * 6 + 1, (4, 1)), (3 * 6 + 3, (3, 3))] {
            let (fused_dw, dw, dconv, dy) =
                fused_and_unfused_weight_grads(kernel, out_channels, moved_to);
            assert_eq!(
                bits(&fused_dw),
                bits(&dw),
                "{kernel}x{kernel}, {out_channels} channels, to {moved_to}"
            );
            // The moved gradient is where the comparison looked (the input rises to the right
            // and down, so each window's own argmax is its bottom right pixel).
            let (h, w) = expected;
            let own = if moved_to == 3 * 6 + 3 {
                dy[(0, 1, 1, 1)]
            } else {
                0.0
            };
            assert_eq!(dconv[(0, 1, h, w)], dy[(0, 1, 0, 0)] + own);
        }
    }
}

/// The weight gradients of the fused and unfused first layer (a `kernel` x `kernel` kernel
/// over an image that makes a 6x6 output, 2x2 pooling) when window (0, 0) of channel 1 has its
/// argmax moved to pixel `moved_to`; and the unpooled gradient and `dy` the unfused one used.
fn fused_and_unfused_weight_grads(
    kernel: usize,
    out_channels: usize,
    moved_to: u32,
) -> (Array4<f32>, Array4<f32>, Array4<f32>, Array4<f32>) {
    let side = 5 + kernel;
    let input = [1, 1, side, side];
    let dims = Conv2dDims::new(input, out_channels, [kernel; 2], [1, 1], Padding::Valid).unwrap();
    let pool = Pool2dDims::new(dims.output_shape(), [2, 2], [2, 2]).unwrap();
    let x = Array4::from_shape_fn(dims.input_shape(), |(_, _, h, w)| {
        (h * side + w) as f32 / (side * side) as f32
    });
    let w = Array4::from_elem(dims.weight_shape(), 0.5f32);
    let mut buffers = Conv2dBuffers::default();
    let mut y = Array4::zeros(pool.output_shape());
    let mut argmax = Array4::zeros(pool.output_shape());
    conv2d_max_pool_forward(
        &dims,
        &pool,
        BeforePool::Relu,
        x.view(),
        w.view(),
        None,
        &mut buffers,
        Backward::Needed,
        y.view_mut(),
        Some(argmax.view_mut()),
    )
    .unwrap();
    argmax[(0, 1, 0, 0)] = moved_to;
    // Half the windows pass no gradient, as behind a ReLU (where the first layer's weight
    // gradient is read at the maxima); windows (0, 0) and (1, 1) still do. Max pooling's own
    // backward pass takes no NO_GRADIENT: it gets a zero gradient there instead.
    let blocked = |h: usize, w: usize| (h + w) % 2 == 1;
    let fused_argmax = Array4::from_shape_fn(pool.output_shape(), |(n, o, h, w)| {
        if blocked(h, w) {
            NO_GRADIENT
        } else {
            argmax[(n, o, h, w)]
        }
    });
    let dy = Array4::from_shape_fn(pool.output_shape(), |(_, o, h, w)| {
        if blocked(h, w) {
            0.0
        } else {
            1.0 + (o * 9 + h * 3 + w) as f32 / 7.0
        }
    });
    let mut fused_dw = Array4::zeros(dims.weight_shape());
    let grads = Conv2dGrads {
        weight: fused_dw.view_mut(),
        bias: None,
        input: None,
    };
    conv2d_max_pool_backward(
        &dims,
        &pool,
        w.view(),
        dy.view(),
        fused_argmax.view(),
        &mut buffers,
        grads,
    )
    .unwrap();
    let mut dconv = Array4::zeros(dims.output_shape());
    max_pool2d_backward(&pool, dy.view(), argmax.view(), dconv.view_mut()).unwrap();
    let mut dw = Array4::zeros(dims.weight_shape());
    let grads = Conv2dGrads {
        weight: dw.view_mut(),
        bias: None,
        input: None,
    };
    conv2d_backward(&dims, w.view(), dconv.view(), &mut buffers, grads).unwrap();
    (fused_dw, dw, dconv, dy)
}

#[test]
fn pooling_without_relu_keeps_negative_maxima_and_nan_as_max_pooling_does() {
    // Every algorithm's 2x2 path and the general one: a ReLU-less fused pooling must not
    // clamp (a BatchNorm after it sees the negative values) nor hide a NaN, which wins a
    // window in max_pool2d_forward as in PyTorch.
    for (channels, out_channels, kernel, stride) in [(1, 4, 3, 2), (16, 32, 3, 2), (1, 4, 3, 1)] {
        let dims = Conv2dDims::new(
            [2, channels, 8, 8],
            out_channels,
            [kernel; 2],
            [1, 1],
            Padding::Valid,
        )
        .unwrap();
        let pool = Pool2dDims::new(dims.output_shape(), [2, 2], [stride; 2]).unwrap();
        let mut x = Array4::from_elem(dims.input_shape(), -1.0f32);
        x[(1, 0, 0, 0)] = f32::NAN;
        let w = Array4::from_elem(dims.weight_shape(), 0.25f32);
        let mut y = Array4::zeros(pool.output_shape());
        let mut argmax = Array4::zeros(pool.output_shape());
        let mut buffers = Conv2dBuffers::default();
        let (x, w) = (x.view(), w.view());
        let (y_out, argmax_out) = (y.view_mut(), Some(argmax.view_mut()));
        conv2d_max_pool_forward(
            &dims,
            &pool,
            BeforePool::Nothing,
            x,
            w,
            None,
            &mut buffers,
            Backward::Needed,
            y_out,
            argmax_out,
        )
        .unwrap();
        let label = format!("{dims:?}, stride {stride}");
        let negative = -0.25 * (channels * kernel * kernel) as f32;
        assert_eq!(y[(0, 0, 1, 1)], negative, "{label}");
        assert_ne!(argmax[(0, 0, 1, 1)], NO_GRADIENT, "{label}");
        assert!(y[(1, 0, 0, 0)].is_nan(), "{label}: {}", y[(1, 0, 0, 0)]);
    }
}
