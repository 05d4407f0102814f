//! Loading and normalizing the whole dataset from its gz files: the start-up cost of every run.
//!
//! `cargo bench -p mnist-data`; needs `cargo xtask fetch-data` first.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mnist_data::testing::real_data_dir;
use mnist_data::{LoadOptions, Normalization, load_dir};

fn load_and_normalize(c: &mut Criterion) {
    let dir = real_data_dir();
    if load_dir(&dir, &LoadOptions::default()).is_err() {
        eprintln!(
            "skipping: no dataset in {} (run `cargo xtask fetch-data`)",
            dir.display()
        );
        return;
    }
    let mut group = c.benchmark_group("mnist");
    group.sample_size(10);
    group.throughput(Throughput::Elements(70_000));
    group.bench_function("load_gz_70000x28x28", |b| {
        b.iter(|| black_box(load_dir(&dir, &LoadOptions::default()).expect("dataset loads")))
    });
    group.bench_function("load_gz_and_normalize_70000x28x28", |b| {
        b.iter(|| {
            let data = load_dir(&dir, &LoadOptions::default()).expect("dataset loads");
            let norm = Normalization::fit(&data.train);
            black_box((data.train.to_nchw(&norm), data.test.to_nchw(&norm)))
        })
    });
    group.finish();
}

criterion_group!(benches, load_and_normalize);
criterion_main!(benches);
