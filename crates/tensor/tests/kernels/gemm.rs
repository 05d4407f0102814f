//! GEMM across row-major, column-major, strided, reversed and transposed operands.

use ndarray::{Array2, ArrayView2, ArrayViewMut2, ShapeBuilder, s};
use proptest::prelude::*;
use tensor::{TensorError, gemm, gemm_parallel};

use crate::reference::{self, Values, assert_close};

/// How an operand is laid out in memory; the logical matrix is the same.
#[derive(Clone, Copy, Debug)]
enum Layout {
    RowMajor,
    ColumnMajor,
    /// Every other column of a wider matrix.
    Stepped,
    /// Rows in reverse order: a negative row stride.
    Reversed,
    /// The transpose of a stored [cols, rows] matrix.
    Transposed,
}

fn any_layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        Just(Layout::RowMajor),
        Just(Layout::ColumnMajor),
        Just(Layout::Stepped),
        Just(Layout::Reversed),
        Just(Layout::Transposed),
    ]
}

/// Storage for a `rows x cols` operand in `layout`, filled with `fill`.
fn storage(
    layout: Layout,
    rows: usize,
    cols: usize,
    fill: &mut impl FnMut() -> f32,
) -> Array2<f32> {
    match layout {
        Layout::RowMajor | Layout::Reversed => Array2::from_shape_simple_fn((rows, cols), fill),
        Layout::ColumnMajor => Array2::from_shape_simple_fn((rows, cols).f(), fill),
        Layout::Stepped => Array2::from_shape_simple_fn((rows, 2 * cols), fill),
        Layout::Transposed => Array2::from_shape_simple_fn((cols, rows), fill),
    }
}

fn view(layout: Layout, a: &Array2<f32>) -> ArrayView2<'_, f32> {
    match layout {
        Layout::RowMajor | Layout::ColumnMajor => a.view(),
        Layout::Stepped => a.slice(s![.., ..;2]),
        Layout::Reversed => a.slice(s![..;-1, ..]),
        Layout::Transposed => a.t(),
    }
}

fn view_mut(layout: Layout, a: &mut Array2<f32>) -> ArrayViewMut2<'_, f32> {
    match layout {
        Layout::RowMajor | Layout::ColumnMajor => a.view_mut(),
        Layout::Stepped => a.slice_mut(s![.., ..;2]),
        Layout::Reversed => a.slice_mut(s![..;-1, ..]),
        Layout::Transposed => a.view_mut().reversed_axes(),
    }
}

/// `C <- alpha * A * B + beta * C` by `gemm` or `gemm_parallel` against the f64 reference,
/// every operand in the given layout.
fn check_against_reference(
    (m, k, n): (usize, usize, usize),
    layouts: (Layout, Layout, Layout),
    alpha: f32,
    beta: f32,
    parallel: bool,
    seed: u64,
) {
    let mut values = Values::new(seed);
    let mut fill = || values.next();
    let a_store = storage(layouts.0, m, k, &mut fill);
    let b_store = storage(layouts.1, k, n, &mut fill);
    let mut c_store = storage(layouts.2, m, n, &mut fill);
    if beta == 0.0 {
        // beta = 0 must never read C: NaN here would poison the result if it did.
        c_store.fill(f32::NAN);
    }
    let (a, b) = (view(layouts.0, &a_store), view(layouts.1, &b_store));
    let (expected, bound) = reference::gemm(alpha, a, b, beta, view(layouts.2, &c_store));
    let c = view_mut(layouts.2, &mut c_store);
    if parallel {
        gemm_parallel(alpha, a, b, beta, c).unwrap();
    } else {
        gemm(alpha, a, b, beta, c).unwrap();
    }
    assert_close(
        "C",
        view(layouts.2, &c_store),
        expected.view(),
        bound.view(),
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn gemm_matches_the_reference_for_any_layout(
        m in 0usize..40, k in 0usize..40, n in 0usize..40,
        layouts in (any_layout(), any_layout(), any_layout()),
        alpha in prop_oneof![Just(1.0f32), Just(-0.5), Just(2.0)],
        beta in prop_oneof![Just(0.0f32), Just(1.0), Just(-1.5)],
        parallel in any::<bool>(),
        seed in any::<u64>(),
    ) {
        check_against_reference((m, k, n), layouts, alpha, beta, parallel, seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Few rows and wide operands, as a dense layer's batch meets its weight: more columns than
    /// the test above reaches, so that whole micro-kernel panels, their tails and the split
    /// over threads all occur.
    #[test]
    fn few_row_gemm_matches_the_reference(
        m in 1usize..10, k in 1usize..80, n in 1usize..300,
        layouts in (any_layout(), any_layout(), any_layout()),
        alpha in prop_oneof![Just(1.0f32), Just(-0.5)],
        beta in prop_oneof![Just(0.0f32), Just(1.0), Just(-1.5)],
        parallel in any::<bool>(),
        seed in any::<u64>(),
    ) {
        check_against_reference((m, k, n), layouts, alpha, beta, parallel, seed);
    }
}

/// `gemm_parallel` on a pool of `threads` threads.
fn gemm_on_threads(
    threads: usize,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    c: &mut Array2<f32>,
) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| gemm_parallel(1.0, a, b, 1.0, c.view_mut()).unwrap());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// A dense layer's shapes at training batch sizes, B large enough (half the time) to be
    /// read in place instead of packed: whole tiles, partial ones and every tail.
    #[test]
    fn dense_layer_gemm_matches_the_reference(
        m in 1usize..24, k in 100usize..900, n in 70usize..400,
        layouts in (any_layout(), any_layout(), any_layout()),
        beta in prop_oneof![Just(0.0f32), Just(1.0), Just(-1.5)],
        seed in any::<u64>(),
    ) {
        check_against_reference((m, k, n), layouts, 1.0, beta, true, seed);
    }
}

#[test]
fn dense_layer_gemms_give_the_same_bits_on_one_thread_and_two() {
    // one-conv's 5408 -> 100 layer at batch 32: forward x W^T, then dx = dy W, dW += dy^T x;
    // two-conv's 1600 -> 128 at batch 64, and the same at an inference batch of 1000
    // (matrixmultiply's case); and a 784 -> 512 layer, whose dx = dy W has K = 512.
    let mut values = Values::new(9);
    let shapes = [
        (32, 5408, 100),
        (64, 1600, 128),
        (1000, 1600, 128),
        (32, 784, 512),
    ];
    for (batch, inputs, outputs) in shapes {
        let x = values.array2((batch, inputs));
        let w = values.array2((outputs, inputs));
        let dy = values.array2((batch, outputs));
        let products: [(ArrayView2<'_, f32>, ArrayView2<'_, f32>); 3] =
            [(x.view(), w.t()), (dy.view(), w.view()), (dy.t(), x.view())];
        for (a, b) in products {
            let mut serial = Array2::from_elem((a.nrows(), b.ncols()), 0.25f32);
            let mut parallel = serial.clone();
            gemm_on_threads(1, a, b, &mut serial);
            gemm_on_threads(2, a, b, &mut parallel);
            let bits = |c: &Array2<f32>| c.mapv(f32::to_bits);
            assert_eq!(
                bits(&serial),
                bits(&parallel),
                "{:?} x {:?}",
                a.shape(),
                b.shape()
            );
        }
    }
}

/// One output of the unpacked dot-product kernel as its documented order makes it: term k in
/// lane k % lanes, each lane a chain of multiply-adds from 0, the lanes added in halves (lane i
/// plus lane i + lanes / 2, and so on).
fn dot_in_lane_order(x: &[f32], w: &[f32], lanes: usize, fused: bool) -> f32 {
    let mul_add = |a: f32, b: f32, c: f32| if fused { a.mul_add(b, c) } else { a * b + c };
    let mut sums = vec![0.0f32; lanes];
    for (k, (&x, &w)) in x.iter().zip(w).enumerate() {
        sums[k % lanes] = mul_add(x, w, sums[k % lanes]);
    }
    let mut n = lanes;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            sums[i] += sums[i + n];
        }
    }
    sums[0]
}

#[test]
fn a_dense_layers_products_are_each_one_sum_in_a_fixed_order() {
    // So that no tile, tail or thread boundary changes an output's bits: the forward pass's
    // dot products in lane order, the backward passes' sums over k in order (one chain of
    // multiply-adds from 0), every output checked. Shapes with tails in every dimension, and
    // operands large enough to be read in place rather than packed.
    let isa = tensor::instruction_set();
    let (lanes, fused) = (if isa == "avx512" { 16 } else { 8 }, isa != "baseline");
    let mul_add = |a: f32, b: f32, c: f32| if fused { a.mul_add(b, c) } else { a * b + c };
    let mut values = Values::new(21);
    let (batch, inputs, outputs) = (13, 5043, 21);
    let x = values.array2((batch, inputs));
    let w = values.array2((outputs, inputs));
    let dy = values.array2((batch, outputs));
    let mut y = Array2::from_elem((batch, outputs), f32::NAN);
    gemm_parallel(1.0, x.view(), w.t(), 0.0, y.view_mut()).unwrap();
    for ((i, j), &v) in y.indexed_iter() {
        let (row, column) = (x.row(i).to_vec(), w.row(j).to_vec());
        let want = dot_in_lane_order(&row, &column, lanes, fused);
        assert_eq!(v.to_bits(), want.to_bits(), "y ({i}, {j})");
    }
    let mut dx = Array2::from_elem((batch, inputs), f32::NAN);
    gemm_parallel(1.0, dy.view(), w.view(), 0.0, dx.view_mut()).unwrap();
    let mut dw = Array2::from_elem((outputs, inputs), f32::NAN);
    gemm_parallel(1.0, dy.t(), x.view(), 0.0, dw.view_mut()).unwrap();
    for ((i, j), &v) in dx.indexed_iter() {
        let want = (0..outputs).fold(0.0, |sum, k| mul_add(dy[(i, k)], w[(k, j)], sum));
        assert_eq!(v.to_bits(), want.to_bits(), "dx ({i}, {j})");
    }
    for ((i, j), &v) in dw.indexed_iter() {
        let want = (0..batch).fold(0.0, |sum, k| mul_add(dy[(k, i)], x[(k, j)], sum));
        assert_eq!(v.to_bits(), want.to_bits(), "dW ({i}, {j})");
    }
}

#[test]
fn large_parallel_gemm_gives_the_same_bits_on_one_thread_and_two() {
    // Big enough to split (over N and, transposed, over M); the split never divides K.
    let mut values = Values::new(5);
    let a = values.array2((150, 200));
    let b = values.array2((200, 300));
    for (a, b) in [(a.view(), b.view()), (b.t(), a.t())] {
        let mut serial = Array2::zeros((a.nrows(), b.ncols()));
        let mut parallel = serial.clone();
        gemm_on_threads(1, a, b, &mut serial);
        gemm_on_threads(2, a, b, &mut parallel);
        assert_eq!(serial, parallel);
    }
}

#[test]
fn a_hand_computed_product() {
    // [[1, 2], [3, 4]] * [[5, 6], [7, 8]] = [[19, 22], [43, 50]] (by hand: 1*5+2*7 = 19, ...);
    // then 2 * that - 1 * C with C = ones.
    let a = ndarray::array![[1.0f32, 2.0], [3.0, 4.0]];
    let b = ndarray::array![[5.0f32, 6.0], [7.0, 8.0]];
    let mut c = Array2::ones((2, 2));
    gemm(2.0, a.view(), b.view(), -1.0, c.view_mut()).unwrap();
    assert_eq!(c, ndarray::array![[37.0, 43.0], [85.0, 99.0]]);
}

#[test]
fn mismatched_shapes_are_an_error_naming_them() {
    let a = Array2::<f32>::zeros((2, 3));
    let b = Array2::<f32>::zeros((4, 5));
    let mut c = Array2::<f32>::zeros((2, 5));
    let err = gemm(1.0, a.view(), b.view(), 0.0, c.view_mut()).unwrap_err();
    assert!(matches!(err, TensorError::Shape { op: "gemm", .. }));
    assert!(
        err.to_string().contains("[2, 3]") && err.to_string().contains("[4, 5]"),
        "{err}"
    );
}
