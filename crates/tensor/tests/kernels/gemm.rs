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

#[test]
fn dense_layer_gemms_give_the_same_bits_on_one_thread_and_two() {
    // one-conv's 5408 -> 100 layer at batch 32: forward x W^T, then dx = dy W, dW += dy^T x.
    let mut values = Values::new(9);
    let x = values.array2((32, 5408));
    let w = values.array2((100, 5408));
    let dy = values.array2((32, 100));
    let products: [(ArrayView2<'_, f32>, ArrayView2<'_, f32>); 3] =
        [(x.view(), w.t()), (dy.view(), w.view()), (dy.t(), x.view())];
    for (a, b) in products {
        let mut serial = Array2::from_elem((a.nrows(), b.ncols()), 0.25f32);
        let mut parallel = serial.clone();
        gemm(1.0, a, b, 1.0, serial.view_mut()).unwrap();
        gemm_parallel(1.0, a, b, 1.0, parallel.view_mut()).unwrap();
        assert_eq!(serial, parallel, "{:?} x {:?}", a.shape(), b.shape());
    }
}

#[test]
fn large_parallel_gemm_matches_single_threaded_bit_for_bit() {
    // Big enough to split (over N and, transposed, over M); the split never divides K.
    let mut values = Values::new(5);
    let a = values.array2((150, 200));
    let b = values.array2((200, 300));
    let mut serial = Array2::zeros((150, 300));
    let mut parallel = Array2::from_elem((150, 300), f32::NAN);
    gemm(1.0, a.view(), b.view(), 0.0, serial.view_mut()).unwrap();
    gemm_parallel(1.0, a.view(), b.view(), 0.0, parallel.view_mut()).unwrap();
    assert_eq!(serial, parallel);
    let mut transposed = Array2::zeros((300, 150));
    gemm_parallel(1.0, b.t(), a.t(), 0.0, transposed.view_mut()).unwrap();
    let mut reference = Array2::zeros((300, 150));
    gemm(1.0, b.t(), a.t(), 0.0, reference.view_mut()).unwrap();
    assert_eq!(transposed, reference);
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
