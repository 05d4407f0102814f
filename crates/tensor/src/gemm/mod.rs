//! General matrix multiply, `C <- alpha * A * B + beta * C`, over ndarray views of any strides.
//!
//! `A` is `[M, K]`, `B` is `[K, N]`, `C` is `[M, N]`. Transposed operands are views with
//! swapped strides (`a.t()`), so the backward passes' `A^T * B` and `A * B^T` copy nothing.
//! When `beta == 0`, `C` is only written, never read: it may hold NaN or garbage.

use ndarray::{ArrayView2, ArrayViewMut2, Axis};

mod unpacked;

use crate::error::TensorError;
use crate::simd::{MulAdd, dispatched, tree_sum};
use crate::vector::Simd;

/// Below this many multiply-adds a GEMM runs on one thread: splitting costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `C <- alpha * A * B + beta * C` on the calling thread.
pub fn gemm(
    alpha: f32,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    c: ArrayViewMut2<'_, f32>,
) -> Result<(), TensorError> {
    check_gemm_shapes(&a, &b, &c)?;
    sgemm_unchecked(alpha, &a, &b, beta, c);
    Ok(())
}

/// `C <- alpha * A * B + beta * C`, split in two halves over rayon when it is large enough: a
/// dense layer's products, which at training batch sizes take kernels that read the operands
/// in place (`unpacked`), else matrixmultiply.
///
/// The split is over the output (rows or columns of `C`), never over `K`, so every element is
/// the same sum in the same order: results are bit-identical whatever the number of threads.
/// matrixmultiply's own threading splits only large `M` (see docs/benchmarks.md).
pub fn gemm_parallel(
    alpha: f32,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    c: ArrayViewMut2<'_, f32>,
) -> Result<(), TensorError> {
    check_gemm_shapes(&a, &b, &c)?;
    match unpacked::choose(&a, &b, &c) {
        Some(kernel) if a.ncols() > 0 && !c.is_empty() => kernel.run(alpha, &a, &b, beta, c),
        _ => split_gemm(alpha, a, b, beta, c),
    }
    Ok(())
}

fn split_gemm(
    alpha: f32,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    mut c: ArrayViewMut2<'_, f32>,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    if m * n * k < PARALLEL_MIN_MACS || (m < 16 && n < 16) {
        sgemm_unchecked(alpha, &a, &b, beta, c);
        return;
    }
    if n >= m {
        // Halves of N, on a multiple of 16 so each half keeps whole micro-kernel panels.
        let mid = (n / 2).next_multiple_of(16).min(n);
        let (b_left, b_right) = b.split_at(Axis(1), mid);
        let (c_left, c_right) = c.view_mut().split_at(Axis(1), mid);
        rayon::join(
            || sgemm_unchecked(alpha, &a, &b_left, beta, c_left),
            || sgemm_unchecked(alpha, &a, &b_right, beta, c_right),
        );
    } else {
        let mid = (m / 2).next_multiple_of(16).min(m);
        let (a_top, a_bottom) = a.split_at(Axis(0), mid);
        let (c_top, c_bottom) = c.view_mut().split_at(Axis(0), mid);
        rayon::join(
            || sgemm_unchecked(alpha, &a_top, &b, beta, c_top),
            || sgemm_unchecked(alpha, &a_bottom, &b, beta, c_bottom),
        );
    }
}

fn check_gemm_shapes(
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
    c: &ArrayViewMut2<'_, f32>,
) -> Result<(), TensorError> {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    if k != k2 || c.dim() != (m, n) {
        return Err(TensorError::Shape {
            op: "gemm",
            detail: format!(
                "A is {:?}, B is {:?}, C is {:?}; need A [M, K], B [K, N], C [M, N]",
                a.shape(),
                b.shape(),
                c.shape()
            ),
        });
    }
    Ok(())
}

/// The matrixmultiply call, for operands whose shapes were checked.
#[allow(unsafe_code)]
pub(crate) fn sgemm_unchecked(
    alpha: f32,
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
    beta: f32,
    mut c: ArrayViewMut2<'_, f32>,
) {
    let ((m, k), n) = (a.dim(), b.ncols());
    if m == 0 || n == 0 {
        return;
    }
    // One row times a matrix with contiguous columns (a dense layer's W^T on one image):
    // matrixmultiply would pack all of B (0.8 MB for two-conv's 1600x128) to use it once.
    if let (1, Some(x)) = (m, a.row(0).to_slice())
        && b.strides()[0] == 1
        && k > 0
    {
        row_times_columns(alpha, x, b.view(), beta, c.row_mut(0));
        return;
    }
    let [rsa, csa] = [a.strides()[0], a.strides()[1]];
    let [rsb, csb] = [b.strides()[0], b.strides()[1]];
    let [rsc, csc] = [c.strides()[0], c.strides()[1]];
    // SAFETY: the shapes were checked (A [m, k], B [k, n], C [m, n]); each pointer is the
    // view's first element and the strides are the views' own, so every address sgemm forms
    // lies inside its view. C is a unique mutable view, so it cannot alias A or B.
    // matrixmultiply documents that C is not read when beta == 0 and that k == 0 scales C.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            rsc,
            csc,
        );
    }
}

/// `c <- alpha * sum + beta * c`, without reading c when beta is 0 (it may be garbage).
#[inline(always)]
fn store(c: &mut f32, alpha: f32, sum: f32, beta: f32) {
    *c = if beta == 0.0 {
        alpha * sum
    } else {
        alpha * sum + beta * *c
    };
}

dispatched! {
    /// `c [N] <- alpha * x [K] * b [K, N] + beta * c` for `b` with contiguous columns: one dot
    /// product per column.
    fn row_times_columns(
        alpha: f32,
        x: &[f32],
        b: ArrayView2<'_, f32>,
        beta: f32,
        c: ndarray::ArrayViewMut1<'_, f32>,
    ) => row_times_columns_body;
}

#[inline(always)]
fn row_times_columns_body<S: Simd, const LANES: usize>(
    _simd: S,
    alpha: f32,
    x: &[f32],
    b: ArrayView2<'_, f32>,
    beta: f32,
    mut c: ndarray::ArrayViewMut1<'_, f32>,
) {
    let column = |j: usize| {
        b.column(j)
            .to_slice()
            .unwrap_or_else(|| unreachable!("columns were checked to be contiguous"))
    };
    // Four columns at a time, so that each vector of x is loaded once for four of them and four
    // chains of multiply-adds are in flight. (A plain dot product per column ran scalar: its
    // accumulators stayed in memory.)
    let n = b.ncols();
    let mut j = 0;
    while j + 4 <= n {
        let columns = [column(j), column(j + 1), column(j + 2), column(j + 3)];
        let sums = dots::<S::MulAdd, LANES, 4>(x, columns);
        for (k, sum) in sums.into_iter().enumerate() {
            store(&mut c[j + k], alpha, sum, beta);
        }
        j += 4;
    }
    while j < n {
        let [sum] = dots::<S::MulAdd, LANES, 1>(x, [column(j)]);
        store(&mut c[j], alpha, sum, beta);
        j += 1;
    }
}

/// `x . columns[i]` for each of COLUMNS columns as long as x: vectors of running sums, added
/// up in a fixed order, then the tail.
#[inline(always)]
fn dots<M: MulAdd, const LANES: usize, const COLUMNS: usize>(
    x: &[f32],
    columns: [&[f32]; COLUMNS],
) -> [f32; COLUMNS] {
    let mut acc = [[0.0f32; LANES]; COLUMNS];
    let whole = x.len() / LANES * LANES;
    for (i, x) in x[..whole].chunks_exact(LANES).enumerate() {
        // Arrays, not slices: lengths the compiler knows, or it keeps the sums in memory.
        let x: &[f32; LANES] = x
            .try_into()
            .unwrap_or_else(|_| unreachable!("whole vectors"));
        for k in 0..COLUMNS {
            let w: &[f32; LANES] = columns[k][i * LANES..(i + 1) * LANES]
                .try_into()
                .unwrap_or_else(|_| unreachable!("whole vectors"));
            let mut sums = acc[k];
            for l in 0..LANES {
                sums[l] = M::mul_add(x[l], w[l], sums[l]);
            }
            acc[k] = sums;
        }
    }
    std::array::from_fn(|k| {
        let mut sum = tree_sum(&acc[k]);
        for (&x, &w) in x[whole..].iter().zip(&columns[k][whole..]) {
            sum = M::mul_add(x, w, sum);
        }
        sum
    })
}
