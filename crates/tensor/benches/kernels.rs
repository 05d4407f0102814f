//! Kernel throughput at the shapes the reference models run, named by shape.
//!
//! `cargo bench -p tensor`. Throughput is in floating-point operations, so criterion's
//! "elem/s" reads as FLOP/s. Compare conv figures with the square sgemm measured in the same
//! run (the ceiling), not with numbers from another run: this machine is noisy.

// Benchmark code: an unwrap that fails is a broken benchmark, reported as such.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ndarray::{Array1, Array2, Array4};
use tensor::{
    ChannelNormalization, Conv2dBuffers, Conv2dDims, Conv2dGrads, Padding, Pool2dDims,
    batch_norm_relu_max_pool_backward, batch_norm_relu_max_pool_forward, conv2d_backward,
    conv2d_forward, gemm, gemm_parallel, max_pool2d_backward, max_pool2d_forward,
};

fn filled2(shape: (usize, usize)) -> Array2<f32> {
    Array2::from_shape_fn(shape, |(i, j)| ((i * 31 + j * 17) % 97) as f32 / 97.0 - 0.5)
}

fn filled4(shape: [usize; 4]) -> Array4<f32> {
    Array4::from_shape_fn(shape, |(a, b, c, d)| {
        ((a * 13 + b * 7 + c * 5 + d * 3) % 89) as f32 / 89.0 - 0.5
    })
}

fn sgemm_square(c: &mut Criterion) {
    let mut group = c.benchmark_group("sgemm");
    for size in [256, 512, 1024] {
        let a = filled2((size, size));
        let b = filled2((size, size));
        let mut out = Array2::zeros((size, size));
        group.throughput(Throughput::Elements(2 * (size * size * size) as u64));
        group.bench_with_input(
            BenchmarkId::new("1thread", format!("{size}x{size}x{size}")),
            &size,
            |bench, _| bench.iter(|| gemm(1.0, a.view(), b.view(), 0.0, out.view_mut()).unwrap()),
        );
        group.bench_with_input(
            BenchmarkId::new("2threads", format!("{size}x{size}x{size}")),
            &size,
            |bench, _| {
                bench.iter(|| gemm_parallel(1.0, a.view(), b.view(), 0.0, out.view_mut()).unwrap())
            },
        );
    }
    group.finish();
}

/// The convolutions of the reference models at batch 64: (name, input [N, C, H, W], O, K, padding).
/// The last three are bn-cnn's "same" 3x3 convolutions (issue 19's modern MNIST CNN).
const CONV_SHAPES: [(&str, [usize; 4], usize, usize, Padding); 7] = [
    ("1to32_3x3_28x28", [64, 1, 28, 28], 32, 3, Padding::Valid),
    ("32to64_3x3_13x13", [64, 32, 13, 13], 64, 3, Padding::Valid),
    ("1to6_5x5_pad2_28x28", [64, 1, 28, 28], 6, 5, Padding::Same),
    ("6to16_5x5_14x14", [64, 6, 14, 14], 16, 5, Padding::Valid),
    (
        "32to32_3x3_same_28x28",
        [64, 32, 28, 28],
        32,
        3,
        Padding::Same,
    ),
    (
        "32to64_3x3_same_14x14",
        [64, 32, 14, 14],
        64,
        3,
        Padding::Same,
    ),
    (
        "64to64_3x3_same_14x14",
        [64, 64, 14, 14],
        64,
        3,
        Padding::Same,
    ),
];

fn conv(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv2d");
    group.sample_size(20);
    for (name, input, out_channels, k, padding) in CONV_SHAPES {
        let dims = Conv2dDims::new(input, out_channels, [k, k], [1, 1], padding).unwrap();
        let x = filled4(dims.input_shape());
        let w = filled4(dims.weight_shape());
        let b = Array1::from_elem(out_channels, 0.1f32);
        let mut y = Array4::zeros(dims.output_shape());
        let dy = filled4(dims.output_shape());
        let mut dw = Array4::zeros(dims.weight_shape());
        let mut db = Array1::zeros(out_channels);
        let mut dx = Array4::zeros(dims.input_shape());
        let mut buffers = Conv2dBuffers::default();
        let flops = dims.forward_flops();

        group.throughput(Throughput::Elements(flops));
        group.bench_function(BenchmarkId::new("forward", name), |bench| {
            bench.iter(|| {
                conv2d_forward(
                    &dims,
                    x.view(),
                    w.view(),
                    Some(b.view()),
                    &mut buffers,
                    tensor::Backward::Needed,
                    y.view_mut(),
                )
                .unwrap()
            })
        });
        // Backward computes dW and dx, each as many FLOPs as the forward pass; the first layer
        // of a model (C = 1) needs no dx, so it is measured without.
        let first_layer = input[1] == 1;
        // Backward reads the unfolded input forward leaves behind, even when only it is run.
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
        group.throughput(Throughput::Elements(if first_layer {
            flops
        } else {
            2 * flops
        }));
        group.bench_function(BenchmarkId::new("backward", name), |bench| {
            bench.iter(|| {
                let grads = Conv2dGrads {
                    weight: dw.view_mut(),
                    bias: Some(db.view_mut()),
                    input: (!first_layer).then(|| dx.view_mut()),
                };
                conv2d_backward(&dims, w.view(), dy.view(), &mut buffers, grads).unwrap()
            })
        });
        group.throughput(Throughput::Elements(if first_layer {
            2 * flops
        } else {
            3 * flops
        }));
        group.bench_function(BenchmarkId::new("forward+backward", name), |bench| {
            bench.iter(|| {
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
                let grads = Conv2dGrads {
                    weight: dw.view_mut(),
                    bias: Some(db.view_mut()),
                    input: (!first_layer).then(|| dx.view_mut()),
                };
                conv2d_backward(&dims, w.view(), dy.view(), &mut buffers, grads).unwrap()
            })
        });
        black_box((&y, &dw, &dx));
    }
    group.finish();
}

fn max_pool(c: &mut Criterion) {
    let mut group = c.benchmark_group("max_pool2d");
    // The conv outputs above, pooled 2x2.
    for (name, input) in [
        ("2x2_64x32x26x26", [64, 32, 26, 26]),
        ("2x2_64x64x11x11", [64, 64, 11, 11]),
        ("2x2_64x6x28x28", [64, 6, 28, 28]),
        ("2x2_64x16x10x10", [64, 16, 10, 10]),
    ] {
        let dims = Pool2dDims::new(input, [2, 2], [2, 2]).unwrap();
        let x = filled4(input);
        let mut y = Array4::zeros(dims.output_shape());
        let mut argmax = Array4::zeros(dims.output_shape());
        let mut dx = Array4::zeros(input);
        group.throughput(Throughput::Elements(x.len() as u64));
        group.bench_function(BenchmarkId::new("forward", name), |bench| {
            bench.iter(|| {
                max_pool2d_forward(&dims, x.view(), y.view_mut(), argmax.view_mut()).unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("backward", name), |bench| {
            bench.iter(|| {
                max_pool2d_backward(&dims, y.view(), argmax.view(), dx.view_mut()).unwrap()
            })
        });
    }
    group.finish();
}

fn batch_norm_pooled(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch_norm_relu_max_pool");
    // The fast recipe's two BatchNorm + ReLU + 2x2 pooling layers, at its batch of 128.
    for (name, input) in [
        ("2x2_128x16x26x26", [128, 16, 26, 26]),
        ("2x2_128x32x11x11", [128, 32, 11, 11]),
    ] {
        let channels = input[1];
        let dims = Pool2dDims::new(input, [2, 2], [2, 2]).unwrap();
        let x = filled4(input);
        let (mean, inv_std) = (Array1::zeros(channels), Array1::ones(channels));
        let (gamma, beta) = (Array1::ones(channels), Array1::zeros(channels));
        let normalization = ChannelNormalization {
            mean: mean.view(),
            inv_std: inv_std.view(),
            gamma: gamma.view(),
            beta: beta.view(),
        };
        let mut y = Array4::zeros(dims.output_shape());
        let mut argmax = Array4::zeros(dims.output_shape());
        let (mut dgamma, mut dbeta) = (Array1::zeros(channels), Array1::zeros(channels));
        group.throughput(Throughput::Elements(x.len() as u64));
        group.bench_function(BenchmarkId::new("forward", name), |bench| {
            bench.iter(|| {
                let argmax = Some(argmax.view_mut());
                batch_norm_relu_max_pool_forward(
                    x.view(),
                    &dims,
                    normalization,
                    y.view_mut(),
                    argmax,
                )
                .unwrap()
            })
        });
        // The input is overwritten by its gradient: each iteration starts from a copy, made
        // outside the timing.
        group.bench_function(BenchmarkId::new("backward", name), |bench| {
            bench.iter_batched_ref(
                || x.clone(),
                |dx| {
                    batch_norm_relu_max_pool_backward(
                        y.view(),
                        argmax.view(),
                        &dims,
                        dx.view_mut(),
                        normalization,
                        dgamma.view_mut(),
                        dbeta.view_mut(),
                        true,
                    )
                    .unwrap()
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, sgemm_square, conv, max_pool, batch_norm_pooled);
criterion_main!(benches);
