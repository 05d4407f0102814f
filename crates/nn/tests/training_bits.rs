//! The bits of training: a few Adam steps of each preset (and of architectures that take the
//! other convolution algorithms) from a fixed seed on a fixed batch give exactly the recorded
//! weights, with 1 thread and with 2, and with the fused
//! convolution + ReLU + pooling layers as with separate ones.
//!
//! The recorded SHA-256 digests come from this implementation itself (commit 4dc572a, before
//! the convolution module was split up, x86_64; those of the architectures with BatchNorm from
//! the commit that moved it into tensor's batch_norm kernels, whose sums run in another
//! order): they guard against unintended changes only.
//! Correctness against an outside reference is `torch_gradients.rs`'s job. A change that is
//! meant to move the bits (a different summation order) must say so and re-record them
//! (`RECORD_TRAINING_BITS=1 cargo test -p nn --test training_bits -- --nocapture`).

#![allow(clippy::unwrap_used)]

use ndarray::{Array1, Array4};
use nn::{Mode, ModelSpec, Optimizer, Rule, Sequential, Targets, preset, softmax_cross_entropy};
use sha2::{Digest, Sha256};

/// 64 sparse "digits": about a fifth of the pixels lit, at positions from a fixed LCG, so
/// that ReLU and pooling leave gradients as sparse as real MNIST's.
fn batch() -> (Array4<f32>, Array1<u8>) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as u32
    };
    let images = Array4::from_shape_fn((64, 1, 28, 28), |_| {
        let r = next();
        if r % 5 == 0 {
            (r % 251) as f32 / 250.0
        } else {
            0.0
        }
    });
    let labels = Array1::from_shape_fn(64, |n| (n * 7 % 10) as u8);
    (images, labels)
}

/// Architectures beyond the presets, so that every convolution algorithm trains here:
/// im2col + GEMM on large images (28x28, 12 filters), on small gathered ones, strided and
/// unpooled; BatchNorm and Dropout.
fn extra_specs() -> Vec<ModelSpec> {
    let im2col = r#"{"name": "im2col", "input": [1, 28, 28], "layers": [
        {"type": "Conv2d", "filters": 8, "kernel": [3, 3], "padding": "same"}, {"type": "ReLU"},
        {"type": "Conv2d", "filters": 12, "kernel": [3, 3], "padding": "same"}, {"type": "ReLU"},
        {"type": "MaxPool2d", "kernel": [2, 2]},
        {"type": "Conv2d", "filters": 12, "kernel": [3, 3]}, {"type": "ReLU"},
        {"type": "MaxPool2d", "kernel": [3, 3], "stride": [2, 2]},
        {"type": "Conv2d", "filters": 10, "kernel": [3, 3], "stride": [2, 2]},
        {"type": "Flatten"}, {"type": "Dense", "units": 10}]}"#;
    let bn_small = r#"{"name": "bn-small", "input": [1, 28, 28], "layers": [
        {"type": "Conv2d", "filters": 16, "kernel": [3, 3], "padding": "same", "bias": false},
        {"type": "BatchNorm2d"}, {"type": "ReLU"},
        {"type": "Conv2d", "filters": 32, "kernel": [3, 3], "padding": "same", "bias": false},
        {"type": "BatchNorm2d"}, {"type": "ReLU"}, {"type": "MaxPool2d", "kernel": [2, 2]},
        {"type": "Conv2d", "filters": 32, "kernel": [3, 3], "padding": "same"}, {"type": "ReLU"},
        {"type": "MaxPool2d", "kernel": [2, 2]}, {"type": "Flatten"},
        {"type": "Dense", "units": 32}, {"type": "BatchNorm1d"}, {"type": "ReLU"},
        {"type": "Dropout", "rate": 0.4}, {"type": "Dense", "units": 10}]}"#;
    [im2col, bn_small]
        .iter()
        .map(|json| ModelSpec::from_json(json).unwrap())
        .collect()
}

/// SHA-256 of every parameter's and buffer's bits after three Adam steps, and of the logits
/// of the batch in inference mode after them; `fused` as [`Sequential::fuse_layers`].
fn trained_digest(spec: ModelSpec, fused: bool) -> String {
    let (images, labels) = batch();
    let mut model = Sequential::new(spec, 7).unwrap();
    model.fuse_layers(fused);
    let mut optimizer = Optimizer::new(Rule::adam(), 1e-3).unwrap();
    for _ in 0..3 {
        model.zero_grad();
        let logits = model.forward(images.clone(), Mode::Train).unwrap();
        let out =
            softmax_cross_entropy(logits.view(), Targets::Classes(labels.view()), 0.0).unwrap();
        model.backward(out.grad).unwrap();
        optimizer.step(&mut model).unwrap();
    }
    let mut hash = Sha256::new();
    model.visit_params(|name, param| {
        hash.update(name.as_bytes());
        param
            .value
            .iter()
            .for_each(|v: &f32| hash.update(v.to_le_bytes()));
    });
    model.visit_buffers(|name, buffer| {
        hash.update(name.as_bytes());
        buffer
            .iter()
            .for_each(|v: &f32| hash.update(v.to_le_bytes()));
    });
    let logits = model.forward(images, Mode::Eval).unwrap();
    logits
        .iter()
        .for_each(|v: &f32| hash.update(v.to_le_bytes()));
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn training_bits_are_the_recorded_ones_with_one_and_two_threads() {
    let specs = nn::PRESETS
        .iter()
        .map(|name| preset(name).unwrap())
        .chain(extra_specs());
    // The kernels' bits depend on their vector width; CI runs this under each cap.
    let isa = tensor::instruction_set();
    let mut failures = Vec::new();
    for spec in specs {
        let name = spec.name.clone();
        let one = in_pool(1, || trained_digest(spec.clone(), true));
        let two = in_pool(2, || trained_digest(spec.clone(), true));
        assert_eq!(one, two, "{name}: 1 and 2 threads differ");
        let unfused = in_pool(2, || trained_digest(spec, false));
        assert_eq!(one, unfused, "{name}: fused and separate layers differ");
        if std::env::var_os("RECORD_TRAINING_BITS").is_some() {
            println!("(\"{isa}\", \"{name}\", \"{one}\"),");
            continue;
        }
        let recorded = RECORDED
            .iter()
            .find(|(i, n, _)| *i == isa && *n == name)
            .map(|(_, _, digest)| *digest);
        if recorded != Some(one.as_str()) {
            failures.push(format!("{isa} {name}: {one}, recorded {recorded:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "the bits moved:\n{}",
        failures.join("\n")
    );
}

/// (instruction set, architecture, digest).
const RECORDED: [(&str, &str, &str); 24] = [
    (
        "avx512",
        "two-conv",
        "ab51f4023c96b96165c63571ccf3c65c977ca252c62b6a7e49c4e8f480ccf6a1",
    ),
    (
        "avx512",
        "one-conv",
        "1758b9b24c7f74765237f11f9f2b034b7f4f0a835f09016541d71d447bcd1c60",
    ),
    (
        "avx512",
        "one-conv-dropout",
        "60f7ad8c7d1bf3fb9754c75869f7f5d8967a05d155a8e52c9bdd400fe55a8500",
    ),
    (
        "avx512",
        "lenet5",
        "99ae31ed4317af7522d1315e396f5c8197e3f66d068988f36d8c0c0cc825dc9d",
    ),
    (
        "avx512",
        "bn-cnn",
        "b22b3272f0c775f7c3c64c59d500cdfb82ecc3975b88d5d42e5d1fd7d5b2d922",
    ),
    (
        "avx512",
        "fast-cnn",
        "db13ce8101db038aad297d50f58165ccdab997ae19a9e2fc94df311e85b728ae",
    ),
    (
        "avx512",
        "im2col",
        "957d1ea8ee53067d9b3b930cd74307377782b0c1384dc452513eec145cc89611",
    ),
    (
        "avx512",
        "bn-small",
        "cba837b51f7c770d2fb898c279d260145808798b9a7215687e977f62915f76f9",
    ),
    (
        "avx2",
        "two-conv",
        "b8bebe1ed81bd82a839efd9d1f7447ad5046e1ff7800d110e5107089bcdb8e28",
    ),
    (
        "avx2",
        "one-conv",
        "5683efa9ff09d0e91789ed791c2691d2499104cd8fc0d64d8b4c1f8abee56598",
    ),
    (
        "avx2",
        "one-conv-dropout",
        "b772eaea8d8af97654f1438d08592f6e7a564ee0d7e17bd3269f07d4ee8ea2b7",
    ),
    (
        "avx2",
        "lenet5",
        "1781cec2b23d5c37aa3cc38c0b5788ab3d584e88f0ac5d8402162eb463b83343",
    ),
    (
        "avx2",
        "bn-cnn",
        "a8994f90047d8687b7607de0baa6aa7db45a6aae7c4e8c4755bf39ea75c859d5",
    ),
    (
        "avx2",
        "fast-cnn",
        "c3b54fb7e99d72421a7bfde735dab39b87d7c289726eb0c14cac55d876c6867b",
    ),
    (
        "avx2",
        "im2col",
        "ccde3400683fce421a56f70c23a7c05e6f2a1ae86700c2742247e5422903c4e5",
    ),
    (
        "avx2",
        "bn-small",
        "b2baeca52d85c62fbe4ccc4eeaba3288d9576b74084268c7194bef4fd88894e7",
    ),
    (
        "baseline",
        "two-conv",
        "5748b9c7ae5ac6980ebc24e92c9d00da06deba0ebed7805f05659affc597d7da",
    ),
    (
        "baseline",
        "one-conv",
        "5efa2266a571368de42798b03a89d476249f18cb15e4744d8594eaa53527efd5",
    ),
    (
        "baseline",
        "one-conv-dropout",
        "bdc9520cdc37c75558f0c7d493f280e00692d105a5ee9ed1af5b827f7faa9773",
    ),
    (
        "baseline",
        "lenet5",
        "7e57cd7fc6ec511e47a311155162e78116d2382fa733bb5d154cd7c14ed47048",
    ),
    (
        "baseline",
        "bn-cnn",
        "e59284b75ee018af37922bcd3354d1889299cf4cf4d4b7507ff15a78f088e205",
    ),
    (
        "baseline",
        "fast-cnn",
        "046947510ef43f8a63338b76871e80897628581a0cda335bf6ae099a3f1d5044",
    ),
    (
        "baseline",
        "im2col",
        "6e5bf8854059c6630533ea51384d79e6c215cd61cdf9268197e630c463643537",
    ),
    (
        "baseline",
        "bn-small",
        "f7a374ec3afdf55bce7575a8a1342e907705391afcfc3e815381ae78c60de01f",
    ),
];
