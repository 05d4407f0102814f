//! Convolution forward and backward against the direct-loop reference.

use ndarray::{Array1, Array4, s};
use proptest::prelude::*;
use tensor::{
    Conv2dBuffers, Conv2dDims, Conv2dGrads, ConvAlgorithm, Padding, TensorError, conv2d_backward,
    conv2d_forward,
};

use crate::reference::{self, Values, assert_close};

fn any_padding() -> impl Strategy<Value = Padding> {
    prop_oneof![
        Just(Padding::Valid),
        Just(Padding::Same),
        (0usize..3, 0usize..3, 0usize..3, 0usize..3).prop_map(|(top, bottom, left, right)| {
            Padding::Explicit {
                top,
                bottom,
                left,
                right,
            }
        }),
    ]
}

/// Runs forward and backward on one random case and compares all four results with the
/// reference; returns without checking when the configuration is (rightly) refused. With an
/// `algorithm`, the case is computed by it (and skipped if it does not support the shape). A
/// `sparse` output gradient (one entry in seven nonzero, as behind ReLU and pooling) takes the
/// backward pass that scatters nonzeros instead of multiplying.
#[allow(clippy::too_many_arguments)]
fn check_against_reference(
    input: (usize, usize, usize, usize),
    out_channels: usize,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: Padding,
    with_bias: bool,
    strided_input: bool,
    seed: u64,
    algorithm: Option<ConvAlgorithm>,
    sparse: bool,
) -> Result<(), TestCaseError> {
    let (n, c, h, w) = input;
    let dims = Conv2dDims::new(
        [n, c, h, w],
        out_channels,
        [kernel.0, kernel.1],
        [stride.0, stride.1],
        padding,
    );
    let dims = match dims {
        Ok(dims) if algorithm.is_some_and(|a| a.supports(&dims).is_err()) => return Ok(()),
        Ok(dims) => dims,
        Err(TensorError::Config { .. }) => {
            // Only a kernel larger than the padded input may be refused.
            let (pt, pb, pl, pr) = match padding {
                Padding::Explicit {
                    top,
                    bottom,
                    left,
                    right,
                } => (top, bottom, left, right),
                _ => (0, 0, 0, 0),
            };
            prop_assert!(kernel.0 > h + pt + pb || kernel.1 > w + pl + pr);
            return Ok(());
        }
        Err(e) => panic!("{e}"),
    };
    let mut values = Values::new(seed);
    // A non-contiguous input: every other column of a wider array.
    let wide = values.array4([n, c, h, 2 * w]);
    let contiguous = values.array4([n, c, h, w]);
    let x = if strided_input {
        wide.slice(s![.., .., .., ..;2])
    } else {
        contiguous.view()
    };
    let weight = values.array4(dims.weight_shape());
    let bias = values.array1(out_channels);
    let bias = with_bias.then(|| bias.view());

    let mut buffers = algorithm.map_or_else(Conv2dBuffers::default, Conv2dBuffers::new);
    let mut y = Array4::from_elem(dims.output_shape(), f32::NAN);
    conv2d_forward(
        &dims,
        x,
        weight.view(),
        bias,
        &mut buffers,
        tensor::Backward::Needed,
        y.view_mut(),
    )
    .unwrap();
    let (expected, bound) = reference::conv_forward(&dims, x, weight.view(), bias);
    assert_close("y", y.view(), expected.view(), bound.view());

    // Parameter gradients accumulate onto what is there; the input gradient is overwritten.
    let mut dy = values.array4(dims.output_shape());
    if sparse {
        for (i, v) in dy.iter_mut().enumerate() {
            if !(i * 5 + seed as usize).is_multiple_of(7) {
                *v = 0.0;
            }
        }
    }
    let dw_before = values.array4(dims.weight_shape());
    let db_before = values.array1(out_channels);
    let mut dw = dw_before.clone();
    let mut db = db_before.clone();
    // With a strided input, a strided input gradient too: every other column of a wider array.
    let mut dx_wide = Array4::from_elem([n, c, h, 2 * w], f32::NAN);
    let mut dx_contiguous = Array4::from_elem(dims.input_shape(), f32::NAN);
    let mut dx = if strided_input {
        dx_wide.slice_mut(s![.., .., .., ..;2])
    } else {
        dx_contiguous.view_mut()
    };
    conv2d_backward(
        &dims,
        weight.view(),
        dy.view(),
        &mut buffers,
        Conv2dGrads {
            weight: dw.view_mut(),
            bias: Some(db.view_mut()),
            input: Some(dx.view_mut()),
        },
    )
    .unwrap();
    let ((dx_ref, dx_bound), (dw_ref, dw_bound), (db_ref, db_bound)) =
        reference::conv_backward(&dims, x, weight.view(), dy.view());
    assert_close("dx", dx.view(), dx_ref.view(), dx_bound.view());
    let dw_ref = dw_ref + dw_before.mapv(f64::from);
    assert_close("dw", dw.view(), dw_ref.view(), dw_bound.view());
    let db_ref = db_ref + db_before.mapv(f64::from);
    assert_close("db", db.view(), db_ref.view(), db_bound.view());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn conv_forward_and_backward_match_the_direct_reference(
        // Up to 19 images: chunks of 1 to 3 images, the last one partial. Small images take the
        // backward pass's gathered (wide GEMM) path.
        input in (1usize..20, 1usize..4, 1usize..10, 1usize..10),
        out_channels in 1usize..5,
        kernel in (1usize..5, 1usize..5),
        stride in (1usize..4, 1usize..4),
        padding in any_padding(),
        with_bias in any::<bool>(),
        strided_input in any::<bool>(),
        seed in any::<u64>(),
        sparse in any::<bool>(),
    ) {
        check_against_reference(input, out_channels, kernel, stride, padding, with_bias, strided_input, seed, None, sparse)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn every_algorithm_matches_the_direct_reference_wherever_it_applies(
        // Each algorithm forced on shapes the default would give another (the implicit GEMM on
        // one input channel, im2col on 16 outputs, ...), where it supports them at all.
        input in (1usize..12, 1usize..5, 1usize..12, 1usize..12),
        out_channels in prop_oneof![1usize..5, Just(16usize), Just(32)],
        kernel in (1usize..4, 1usize..4),
        stride in (1usize..3, 1usize..3),
        padding in any_padding(),
        with_bias in any::<bool>(),
        seed in any::<u64>(),
        sparse in any::<bool>(),
        algorithm in prop_oneof![
            Just(ConvAlgorithm::Direct),
            Just(ConvAlgorithm::ImplicitGemm),
            Just(ConvAlgorithm::Im2colGemm),
        ],
    ) {
        check_against_reference(input, out_channels, kernel, stride, padding, with_bias, false, seed, Some(algorithm), sparse)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn scattering_over_many_channels_matches_the_direct_reference(
        // Kernel rows of at least a vector, whose sums the scatter keeps in registers: 16 or
        // 32 channels (KW*C whole vectors), or 6 and 7 (LeNet-5's 6 channels, KW*C = 30 for
        // its 5x5 kernel, and runs that end inside a vector of AVX-512's and AVX2's; shorter
        // runs, as for KW = 1, scatter onto memory). Up to 70 output channels, whose
        // per-pixel masks take one to three words.
        input in (1usize..10, prop_oneof![Just(6usize), Just(7), Just(16), Just(32)], 3usize..9, 3usize..9),
        out_channels in prop_oneof![1usize..5, 30usize..70],
        kernel in (1usize..4, 1usize..6),
        stride in (1usize..3, 1usize..3),
        padding in any_padding(),
        seed in any::<u64>(),
    ) {
        check_against_reference(input, out_channels, kernel, stride, padding, true, false, seed, None, true)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    #[test]
    fn direct_convolution_matches_the_direct_reference(
        // Stride 1 and receptive fields of up to 32 values (1x5x5, 3x3x3, 2x4x4, ...): the
        // direct path, up to a first layer's 28x28 images; with few output channels, from
        // the padded image, and with as many as receptive-field values or more, unfolded.
        input in (1usize..20, 1usize..4, 1usize..30, 1usize..30),
        out_channels in prop_oneof![1usize..7, 7usize..40],
        kernel in (1usize..6, 1usize..6),
        padding in any_padding(),
        with_bias in any::<bool>(),
        strided_input in any::<bool>(),
        seed in any::<u64>(),
    ) {
        prop_assume!(input.1 * kernel.0 * kernel.1 <= 32);
        check_against_reference(input, out_channels, kernel, (1, 1), padding, with_bias, strided_input, seed, Some(ConvAlgorithm::Direct), false)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn conv_on_large_images_matches_the_direct_reference(
        // 256 output pixels or more per image: the backward pass's per-image path (with
        // receptive fields of more than 32 values, which are not computed directly).
        input in (1usize..12, 9usize..12, 17usize..24, 17usize..24),
        out_channels in 1usize..4,
        kernel in (2usize..3, 2usize..3),
        padding in prop_oneof![Just(Padding::Valid), Just(Padding::Same)],
        with_bias in any::<bool>(),
        seed in any::<u64>(),
        sparse in any::<bool>(),
    ) {
        check_against_reference(input, out_channels, kernel, (1, 1), padding, with_bias, false, seed, Some(ConvAlgorithm::Im2colGemm), sparse)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn implicit_gemm_input_gradient_by_convolution_matches_the_direct_reference(
        // Input channels in blocks of 16 and stride 1 (mostly): the input gradient of a dense
        // output gradient is then itself a convolution (`conv/transposed.rs`); paddings up to
        // the kernel's size, where it falls back to unfolding.
        input in (1usize..5, prop_oneof![Just(16usize), Just(32)], 2usize..10, 2usize..10),
        out_channels in prop_oneof![Just(16usize), Just(32), Just(64)],
        kernel in (1usize..4, 1usize..4),
        stride in prop_oneof![3 => Just((1usize, 1usize)), 1 => Just((2, 1))],
        padding in any_padding(),
        with_bias in any::<bool>(),
        strided_input in any::<bool>(),
        seed in any::<u64>(),
    ) {
        check_against_reference(input, out_channels, kernel, stride, padding, with_bias, strided_input, seed, Some(ConvAlgorithm::ImplicitGemm), false)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn implicit_gemm_convolution_matches_the_direct_reference(
        // Output channels in blocks of 16 (the implicit-GEMM forward pass: tiles of one, two
        // and four vector registers of channels), receptive fields of more than 32 values (9 to
        // 11 channels, 2x2 to 3x3 kernels), both strides.
        input in (1usize..6, 9usize..12, 2usize..9, 2usize..9),
        out_channels in prop_oneof![Just(16usize), Just(32), Just(48), Just(64), Just(128)],
        kernel in (2usize..4, 2usize..4),
        stride in (1usize..3, 1usize..3),
        padding in any_padding(),
        with_bias in any::<bool>(),
        strided_input in any::<bool>(),
        seed in any::<u64>(),
        sparse in any::<bool>(),
    ) {
        check_against_reference(input, out_channels, kernel, stride, padding, with_bias, strided_input, seed, Some(ConvAlgorithm::ImplicitGemm), sparse)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn implicit_gemm_convolution_of_large_images_matches_the_direct_reference(
        // 256 output pixels or more per image at stride 1 (the backward pass's per-image
        // path), and kernel rows shorter than a weight-gradient tile (1x7x6: the backward
        // pass unfolds the images again instead), 16 channels (the input gradient by convolution).
        batch in 1usize..3,
        (channels, kernel) in prop_oneof![Just((9usize, (2usize, 2usize))), Just((16, (3, 3))), Just((1, (7, 6)))],
        size in (17usize..21, 17usize..21),
        out_channels in prop_oneof![Just(16usize), Just(64)],
        stride in (1usize..3, 1usize..3),
        padding in any_padding(),
        with_bias in any::<bool>(),
        seed in any::<u64>(),
        sparse in any::<bool>(),
    ) {
        let input = (batch, channels, size.0, size.1);
        check_against_reference(input, out_channels, kernel, stride, padding, with_bias, false, seed, Some(ConvAlgorithm::ImplicitGemm), sparse)?;
    }
}

#[test]
fn a_hand_computed_convolution() {
    // x = [[1,2,3],[4,5,6],[7,8,9]], kernel [[1,0],[0,-1]], bias 0.5, valid, stride 1:
    // y[i][j] = x[i][j] - x[i+1][j+1] + 0.5 = 1-5+0.5, 2-6+0.5, 4-8+0.5, 5-9+0.5 = -3.5 each.
    let dims = Conv2dDims::new([1, 1, 3, 3], 1, [2, 2], [1, 1], Padding::Valid).unwrap();
    let x = Array4::from_shape_vec((1, 1, 3, 3), (1..=9).map(|v| v as f32).collect()).unwrap();
    let w = Array4::from_shape_vec((1, 1, 2, 2), vec![1.0, 0.0, 0.0, -1.0]).unwrap();
    let b = Array1::from_elem(1, 0.5f32);
    let mut y = Array4::zeros((1, 1, 2, 2));
    let mut buffers = Conv2dBuffers::default();
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
    assert_eq!(y.iter().copied().collect::<Vec<_>>(), vec![-3.5; 4]);

    // With dy = ones: dw[kh][kw] = sum of the 2x2 window of x at offset (kh, kw):
    // (1+2+4+5, 2+3+5+6, 4+5+7+8, 5+6+8+9) = (12, 16, 24, 28); db = 4;
    // dx = w placed at each output position: +1 at the top-left 2x2, -1 at the bottom-right 2x2.
    let dy = Array4::ones((1, 1, 2, 2));
    let mut dw = Array4::zeros((1, 1, 2, 2));
    let mut db = Array1::zeros(1);
    let mut dx = Array4::zeros((1, 1, 3, 3));
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
    assert_eq!(
        dw.iter().copied().collect::<Vec<_>>(),
        vec![12.0, 16.0, 24.0, 28.0]
    );
    assert_eq!(db[0], 4.0);
    assert_eq!(
        dx.iter().copied().collect::<Vec<_>>(),
        vec![1.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, -1.0, -1.0]
    );
}

#[test]
fn same_padding_follows_tensorflow() {
    // TensorFlow: out = ceil(in / stride); pad_total = max((out - 1) * stride + k - in, 0),
    // the odd unit at the bottom/right.
    let cases = [
        // (in, k, stride) -> (out, top, bottom)
        ((28, 5, 1), (28, 2, 2)),
        ((13, 3, 2), (7, 1, 1)),
        ((14, 3, 2), (7, 0, 1)),
        ((5, 4, 1), (5, 1, 2)),
    ];
    for ((size, k, stride), (out, top, bottom)) in cases {
        let d = Conv2dDims::new(
            [1, 1, size, size],
            1,
            [k, k],
            [stride, stride],
            Padding::Same,
        )
        .unwrap();
        assert_eq!(
            (d.out_h(), d.pad_top, d.pad_bottom),
            (out, top, bottom),
            "in {size} k {k} s {stride}"
        );
        assert_eq!((d.out_w(), d.pad_left, d.pad_right), (out, top, bottom));
    }
}

#[test]
fn impossible_configurations_and_shapes_are_errors() {
    assert!(Conv2dDims::new([1, 1, 3, 3], 1, [4, 4], [1, 1], Padding::Valid).is_err());
    assert!(Conv2dDims::new([1, 1, 3, 3], 1, [3, 3], [0, 1], Padding::Valid).is_err());
    assert!(Conv2dDims::new([1, 0, 3, 3], 1, [3, 3], [1, 1], Padding::Valid).is_err());

    let dims = Conv2dDims::new([2, 1, 5, 5], 3, [3, 3], [1, 1], Padding::Valid).unwrap();
    let w = Array4::zeros(dims.weight_shape());
    let mut buffers = Conv2dBuffers::default();
    let mut y = Array4::zeros(dims.output_shape());
    let wrong_x = Array4::zeros((2, 1, 6, 5));
    let err = conv2d_forward(
        &dims,
        wrong_x.view(),
        w.view(),
        None,
        &mut buffers,
        tensor::Backward::Needed,
        y.view_mut(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("input has shape [2, 1, 6, 5], expected [2, 1, 5, 5]"),
        "{err}"
    );

    // Backward before any forward has no unfolded input to use.
    let dy = Array4::zeros(dims.output_shape());
    let mut dw = Array4::zeros(dims.weight_shape());
    let err = conv2d_backward(
        &dims,
        w.view(),
        dy.view(),
        &mut Conv2dBuffers::default(),
        Conv2dGrads {
            weight: dw.view_mut(),
            bias: None,
            input: None,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("forward pass missing"), "{err}");
}

#[test]
fn inference_forward_gives_the_same_bits_and_keeps_nothing_for_backward() {
    // Three input channels are computed directly, four by im2col + GEMM, four into 64 output
    // channels by the implicit GEMM.
    for (channels, out_channels) in [(3, 4), (4, 4), (4, 64)] {
        inference_forward_matches_training_forward(channels, out_channels);
    }
}

fn inference_forward_matches_training_forward(channels: usize, out_channels: usize) {
    let dims = Conv2dDims::new(
        [19, channels, 9, 9],
        out_channels,
        [3, 3],
        [1, 1],
        Padding::Same,
    )
    .unwrap();
    let direct = dims.algorithm() == ConvAlgorithm::Direct;
    assert_eq!(direct, channels == 3);
    let mut values = Values::new(21);
    let x = values.array4(dims.input_shape());
    let w = values.array4(dims.weight_shape());
    let b = values.array1(out_channels);
    let run = |backward| {
        let mut buffers = Conv2dBuffers::default();
        let mut y = Array4::from_elem(dims.output_shape(), f32::NAN);
        conv2d_forward(
            &dims,
            x.view(),
            w.view(),
            Some(b.view()),
            &mut buffers,
            backward,
            y.view_mut(),
        )
        .unwrap();
        (y, buffers)
    };
    let (training, _) = run(tensor::Backward::Needed);
    let (inference, mut buffers) = run(tensor::Backward::NotNeeded);
    assert_eq!(training.mapv(f32::to_bits), inference.mapv(f32::to_bits));
    let dy = Array4::zeros(dims.output_shape());
    let mut dw = Array4::zeros(dims.weight_shape());
    let grads = Conv2dGrads {
        weight: dw.view_mut(),
        bias: None,
        input: None,
    };
    assert!(conv2d_backward(&dims, w.view(), dy.view(), &mut buffers, grads).is_err());
}

/// Buffers reused with other weights (as training changes them every step) give what fresh
/// buffers give: the implicit GEMM's packed weights are not stale.
#[test]
fn reused_buffers_see_new_weights() {
    let dims = Conv2dDims::new([3, 8, 7, 7], 16, [3, 3], [1, 1], Padding::Valid).unwrap();
    let mut values = Values::new(5);
    let x = values.array4(dims.input_shape());
    let first = values.array4(dims.weight_shape());
    let mut second = first.clone();
    second[(3, 2, 1, 0)] += 0.5;
    let forward = |buffers: &mut Conv2dBuffers, w: &Array4<f32>| {
        let mut y = Array4::from_elem(dims.output_shape(), f32::NAN);
        conv2d_forward(
            &dims,
            x.view(),
            w.view(),
            None,
            buffers,
            tensor::Backward::NotNeeded,
            y.view_mut(),
        )
        .unwrap();
        y.mapv(f32::to_bits)
    };
    let mut reused = Conv2dBuffers::default();
    let before = forward(&mut reused, &first);
    let after = forward(&mut reused, &second);
    assert_ne!(before, after);
    assert_eq!(after, forward(&mut Conv2dBuffers::default(), &second));
    assert_eq!(before, forward(&mut reused, &first));
}

/// im2col and col2im give the same values into and from strided views (a caller's transposed
/// buffers) as into and from contiguous ones.
#[test]
fn unfolding_and_folding_accept_strided_views() {
    let dims = Conv2dDims::new([1, 2, 5, 6], 3, [3, 2], [2, 1], Padding::Same).unwrap();
    let mut values = Values::new(11);
    let x = values.array4(dims.input_shape());
    let (patch, pixels) = (dims.patch_len(), dims.out_pixels());
    let image = x.index_axis(ndarray::Axis(0), 0);

    let mut contiguous = ndarray::Array2::from_elem((patch, pixels), f32::NAN);
    tensor::im2col(&dims, image, contiguous.view_mut());
    let mut transposed = ndarray::Array2::from_elem((pixels, patch), f32::NAN);
    tensor::im2col(&dims, image, transposed.view_mut().reversed_axes());
    assert_eq!(transposed.t(), contiguous);
    // Some taps fall in the padding, and every other value comes from the image.
    assert!(contiguous.iter().any(|&v| v == 0.0));
    assert!(
        contiguous
            .iter()
            .all(|v| *v == 0.0 || x.iter().any(|u| u == v))
    );

    let dcols = values.array4([1, 1, patch, pixels]);
    let dcols = dcols.slice(s![0, 0, .., ..]);
    let mut dx = ndarray::Array3::from_elem((2, 5, 6), f32::NAN);
    tensor::col2im(&dims, dcols, dx.view_mut());
    let mut dx_strided = ndarray::Array3::from_elem((6, 5, 2), f32::NAN);
    tensor::col2im(&dims, dcols.t().t(), dx_strided.view_mut().reversed_axes());
    assert_eq!(dx_strided.view().reversed_axes(), dx);
    let dcols_t = dcols.t().as_standard_layout().into_owned();
    let mut dx_from_strided_cols = ndarray::Array3::from_elem((2, 5, 6), f32::NAN);
    tensor::col2im(&dims, dcols_t.t(), dx_from_strided_cols.view_mut());
    assert_eq!(dx_from_strided_cols, dx);
    assert!(dx.iter().all(|v| v.is_finite()));
}
