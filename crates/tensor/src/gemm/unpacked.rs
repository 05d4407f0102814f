//! A dense layer's GEMMs at training batch sizes, read in place instead of packed.
//!
//! Why: matrixmultiply packs both operands into its own layout on every call, which pays when
//! each packed value is used many times. A dense layer at batch 32-64 multiplies a weight
//! matrix of megabytes by a batch of a few dozen rows: packing W (one-conv's 5408 -> 100
//! layer, 2.2 MB, on each of a step's three products) cost more than the multiply-adds, and
//! the layer took 61% of one-conv's step at a fifth of the peak.
//!
//! Two kernels, chosen by where the operands are contiguous:
//! - [`dots`]: `x W^T` (the forward pass): rows of A and columns of B are contiguous, so each
//!   output is a dot product, summed in vector lanes, ROWS x COLS outputs at a time.
//! - [`broadcast_rows`]: `dy W` and `dy^T x` (the backward pass): rows of B and C are
//!   contiguous and K, the batch or the layer's outputs, is at most 1024: each value of A is
//!   broadcast against a few vectors of a row of B, a tile of C in registers across all of K.
//!
//! Every output is one sum in a fixed order whatever the tile or thread that computes it, so
//! splitting C between threads keeps the bits.

use std::ops::Range;

use ndarray::{ArrayView2, ArrayViewMut2, Axis};

use super::{PARALLEL_MIN_MACS, store};
use crate::simd::dispatched;
use crate::vector::Simd;

/// The most values of A [`dots`] takes: it reads all of A once per few columns of B, so A
/// should stay in a core's L2 (1 MB).
pub(super) const DOTS_MAX_A: usize = 1 << 18;

/// The longest K [`broadcast_rows`] takes: it reads a K x (a few vectors) block of B for each
/// tile of A, which should stay in L2 (256 KB at K = 1024). Up to there it beat
/// matrixmultiply's packing (`dy W` of a 3136 -> 1024 layer at batch 64: 1.00 against
/// 1.27 ms; 1024 -> 1024, 0.38 against 0.48 ms; even at K = 512, 784 outputs); at K = 2048
/// it lost (1.03 against 0.97 ms).
pub(super) const BROADCAST_MAX_K: usize = 1024;

/// The fewest values of B for which reading it in place pays: packing a smaller B is cheap
/// and matrixmultiply's kernel then wins (lenet5's 400 -> 120 layer, B of 48k values: its
/// backward pass took 0.035-0.040 ms packed, 0.064 ms unpacked; 120 -> 84, 0.012 against
/// 0.022 ms).
pub(super) const MIN_B: usize = 1 << 16;

/// The kernel for these operands, if one applies.
pub(super) fn choose(
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
    c: &ArrayViewMut2<'_, f32>,
) -> Option<Kernel> {
    let (m, k) = a.dim();
    if b.len() < MIN_B {
        return None;
    }
    let contiguous_rows = |strides: &[isize]| strides[1] == 1;
    let contiguous_columns = |strides: &[isize]| strides[0] == 1;
    if m * k <= DOTS_MAX_A && contiguous_rows(a.strides()) && contiguous_columns(b.strides()) {
        Some(Kernel::Dots)
    } else if k <= BROADCAST_MAX_K && b.is_standard_layout() && contiguous_rows(c.strides()) {
        Some(Kernel::BroadcastRows)
    } else {
        None
    }
}

/// Which of this module's kernels multiplies a pair of operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    /// [`dots`].
    Dots,
    /// [`broadcast_rows`].
    BroadcastRows,
}

impl Kernel {
    /// `C <- alpha * A * B + beta * C` (C not read when beta is 0), for operands this kernel
    /// was chosen for: in two halves of C's columns over rayon when there is enough work (the
    /// split never divides K, so the bits do not depend on it).
    pub(super) fn run(
        self,
        alpha: f32,
        a: &ArrayView2<'_, f32>,
        b: &ArrayView2<'_, f32>,
        beta: f32,
        c: ArrayViewMut2<'_, f32>,
    ) {
        let ((m, k), n) = (a.dim(), b.ncols());
        // Halves on whole tiles: four columns of dots, one block of broadcast_rows.
        let align = match self {
            Kernel::Dots => 4,
            Kernel::BroadcastRows => 64,
        };
        if m * k * n < PARALLEL_MIN_MACS || n < 2 * align {
            self.run_columns(alpha, a, b, 0, beta, c);
            return;
        }
        let mid = (n / 2).next_multiple_of(align).min(n);
        let (left, right) = c.split_at(Axis(1), mid);
        rayon::join(
            || self.run_columns(alpha, a, b, 0, beta, left),
            || self.run_columns(alpha, a, b, mid, beta, right),
        );
    }

    /// `C <- alpha * A * B[.., first_column..] + beta * C` for `c` as many columns of C.
    fn run_columns(
        self,
        alpha: f32,
        a: &ArrayView2<'_, f32>,
        b: &ArrayView2<'_, f32>,
        first_column: usize,
        beta: f32,
        c: ArrayViewMut2<'_, f32>,
    ) {
        match self {
            Kernel::Dots => dots(alpha, a, b, first_column, beta, c),
            Kernel::BroadcastRows => broadcast_rows(alpha, a, b, first_column, beta, c),
        }
    }
}

dispatched! {
    /// `C <- alpha * A * B + beta * C`, C being B's columns from `first_column` on, for A with
    /// contiguous rows and B with contiguous columns: each output the dot product of a row
    /// and a column, summed in LANES lanes (term k in lane k % LANES), the lanes added in a
    /// fixed tree.
    fn dots(
        alpha: f32,
        a: &ArrayView2<'_, f32>,
        b: &ArrayView2<'_, f32>,
        first_column: usize,
        beta: f32,
        c: ArrayViewMut2<'_, f32>,
    ) => dots_body;
}

#[inline(always)]
fn dots_body<S: Simd, const LANES: usize>(
    simd: S,
    alpha: f32,
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
    first_column: usize,
    beta: f32,
    mut c: ArrayViewMut2<'_, f32>,
) {
    let (m, n) = c.dim();
    let row = |i: usize| {
        a.row(i)
            .to_slice()
            .unwrap_or_else(|| unreachable!("rows were checked to be contiguous"))
    };
    let column = |j: usize| {
        b.column(first_column + j)
            .to_slice()
            .unwrap_or_else(|| unreachable!("columns were checked to be contiguous"))
    };
    // Four rows by four columns: each vector of a row serves four columns and each vector of
    // a column four rows, 16 sums in flight. Then the rows and columns left over one at a time.
    const TILE: usize = 4;
    let (whole_m, whole_n) = (m / TILE * TILE, n / TILE * TILE);
    for j in (0..whole_n).step_by(TILE) {
        let columns: [&[f32]; TILE] = std::array::from_fn(|t| column(j + t));
        for i in (0..whole_m).step_by(TILE) {
            let rows: [&[f32]; TILE] = std::array::from_fn(|t| row(i + t));
            let sums = dot_tile::<S, TILE, TILE>(simd, rows, columns);
            for (r, sums) in sums.iter().enumerate() {
                for (t, &sum) in sums.iter().enumerate() {
                    store(&mut c[(i + r, j + t)], alpha, sum, beta);
                }
            }
        }
        for i in whole_m..m {
            let [sums] = dot_tile::<S, 1, TILE>(simd, [row(i)], columns);
            for (t, &sum) in sums.iter().enumerate() {
                store(&mut c[(i, j + t)], alpha, sum, beta);
            }
        }
    }
    for j in whole_n..n {
        for i in 0..m {
            let [[sum]] = dot_tile::<S, 1, 1>(simd, [row(i)], [column(j)]);
            store(&mut c[(i, j)], alpha, sum, beta);
        }
    }
}

/// `rows[r] . columns[t]` for every pair, all as long as K: a register of running sums each
/// (term k in lane k % LANES, the last partial register's terms from zero-padded copies),
/// added up as [`Simd::sum`] adds.
#[inline(always)]
fn dot_tile<S: Simd, const ROWS: usize, const COLS: usize>(
    simd: S,
    rows: [&[f32]; ROWS],
    columns: [&[f32]; COLS],
) -> [[f32; COLS]; ROWS] {
    let k = rows[0].len();
    let whole = k / S::LANES * S::LANES;
    let mut acc = [[simd.splat(0.0); COLS]; ROWS];
    for base in (0..whole).step_by(S::LANES) {
        let xs: [S::V; ROWS] = std::array::from_fn(|r| simd.load(&rows[r][base..]));
        let ws: [S::V; COLS] = std::array::from_fn(|t| simd.load(&columns[t][base..]));
        add_products(simd, &mut acc, xs, ws);
    }
    if whole < k {
        // Zeros times zeros past the end add nothing to any lane.
        let xs: [S::V; ROWS] = std::array::from_fn(|r| padded_tail(simd, &rows[r][whole..]));
        let ws: [S::V; COLS] = std::array::from_fn(|t| padded_tail(simd, &columns[t][whole..k]));
        add_products(simd, &mut acc, xs, ws);
    }
    std::array::from_fn(|r| std::array::from_fn(|t| simd.sum(acc[r][t])))
}

/// `acc[r][t] += xs[r] * ws[t]`. (Functions, not closures: a closure was not always inlined
/// into the `#[target_feature]` function, and its intrinsics became calls.)
#[inline(always)]
fn add_products<S: Simd, const ROWS: usize, const COLS: usize>(
    simd: S,
    acc: &mut [[S::V; COLS]; ROWS],
    xs: [S::V; ROWS],
    ws: [S::V; COLS],
) {
    for (acc, &x) in acc.iter_mut().zip(&xs) {
        for (acc, &w) in acc.iter_mut().zip(&ws) {
            *acc = simd.mul_add(x, w, *acc);
        }
    }
}

/// The last values of a row, fewer than a register, with zeros after them.
#[inline(always)]
fn padded_tail<S: Simd>(simd: S, values: &[f32]) -> S::V {
    let mut lanes = [0.0f32; 16];
    lanes[..values.len()].copy_from_slice(values);
    simd.load(&lanes)
}

dispatched! {
    /// `C <- alpha * A * B + beta * C`, C being B's columns from `first_column` on, for B in
    /// standard layout and C with contiguous rows: a tile of C (a few rows by a few vectors of
    /// columns) in registers while each A[i, k] is broadcast against row k of B, for k in
    /// order, so that each output is one chain of multiply-adds from 0.
    fn broadcast_rows(
        alpha: f32,
        a: &ArrayView2<'_, f32>,
        b: &ArrayView2<'_, f32>,
        first_column: usize,
        beta: f32,
        c: ArrayViewMut2<'_, f32>,
    ) => broadcast_rows_body;
}

#[inline(always)]
fn broadcast_rows_body<S: Simd, const LANES: usize>(
    simd: S,
    alpha: f32,
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
    first_column: usize,
    beta: f32,
    c: ArrayViewMut2<'_, f32>,
) {
    // ROWS * VECTORS sums, VECTORS values of B and a broadcast must fit the registers: 32
    // with AVX-512, 16 with AVX2 (as in the implicit GEMM's tiles).
    if LANES >= 16 {
        broadcast_tiles::<S, 6>(simd, alpha, a, b, first_column, beta, c);
    } else {
        broadcast_tiles::<S, 3>(simd, alpha, a, b, first_column, beta, c);
    }
}

#[inline(always)]
fn broadcast_tiles<S: Simd, const ROWS: usize>(
    simd: S,
    alpha: f32,
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
    first_column: usize,
    beta: f32,
    mut c: ArrayViewMut2<'_, f32>,
) {
    let ((m, k), (n, width)) = (a.dim(), (c.ncols(), b.ncols()));
    let b = b
        .as_slice()
        .unwrap_or_else(|| unreachable!("B was checked to be in standard layout"));
    let b = Rows {
        values: b,
        width,
        first_column,
    };
    // A in tiles of ROWS rows, k by k: [tile][k][ROWS], a last partial tile repeating its last
    // row (computed, not stored). A is small (a batch of rows, K at most 1024), B is not
    // packed at all.
    let tiles = m.div_ceil(ROWS);
    let mut packed = vec![0.0f32; tiles * k * ROWS];
    // Row by row of A, each walked by its own stride (indexing each value cost more than the
    // products of lenet5's small layers).
    for i in 0..tiles * ROWS {
        let (t, r) = (i / ROWS, i % ROWS);
        let tile = &mut packed[t * k * ROWS..(t + 1) * k * ROWS];
        for (value, &x) in tile[r..].iter_mut().step_by(ROWS).zip(a.row(i.min(m - 1))) {
            *value = x;
        }
    }
    let packed = Packed::<ROWS> {
        values: &packed,
        m,
        k,
    };
    // Blocks of four vectors of columns, then single vectors, then the last columns padded.
    let lanes = S::LANES;
    let blocks = n / (4 * lanes) * (4 * lanes);
    let vectors = n / lanes * lanes;
    block_columns::<S, ROWS, 4>(simd, alpha, packed, b, 0..blocks, beta, &mut c);
    block_columns::<S, ROWS, 1>(simd, alpha, packed, b, blocks..vectors, beta, &mut c);
    tail_columns::<S, ROWS>(simd, alpha, packed, b, vectors..n, beta, &mut c);
}

/// The last `columns` of C, fewer than a register: B's columns copied into a zero-padded
/// [K, LANES] block, so that they too take whole registers (the padding's sums dropped).
#[inline(always)]
fn tail_columns<S: Simd, const ROWS: usize>(
    simd: S,
    alpha: f32,
    a: Packed<'_, ROWS>,
    b: Rows<'_>,
    columns: Range<usize>,
    beta: f32,
    c: &mut ArrayViewMut2<'_, f32>,
) {
    let (lanes, count) = (S::LANES, columns.len());
    if count == 0 {
        return;
    }
    let mut block = vec![0.0f32; a.k * lanes];
    for (kk, row) in block.chunks_exact_mut(lanes).enumerate() {
        row[..count].copy_from_slice(b.row(kk, columns.start, count));
    }
    for (t, tile) in a.tiles() {
        let acc = tile_sums::<S, ROWS, 1>(simd, tile, |kk| &block[kk * lanes..][..lanes]);
        let first = t * ROWS;
        for (r, [acc]) in acc.iter().enumerate().take(a.m - first) {
            let mut sums = [0.0f32; 16];
            simd.store(*acc, &mut sums);
            for (j, &sum) in columns.clone().zip(&sums) {
                store(&mut c[(first + r, j)], alpha, sum, beta);
            }
        }
    }
}

/// The ROWS x VECTORS registers of sums of one tile of A (`tile`, `[k][ROWS]`) against the
/// rows of B, `row(kk)` being VECTORS registers of row kk: each A[i, k] broadcast, for k in
/// order, so that each sum is one chain of multiply-adds from 0.
#[inline(always)]
fn tile_sums<'b, S: Simd, const ROWS: usize, const VECTORS: usize>(
    simd: S,
    tile: &[f32],
    row: impl Fn(usize) -> &'b [f32],
) -> [[S::V; VECTORS]; ROWS] {
    let lanes = S::LANES;
    let mut acc = [[simd.splat(0.0); VECTORS]; ROWS];
    for (kk, xs) in tile.chunks_exact(ROWS).enumerate() {
        let row = row(kk);
        let bs: [S::V; VECTORS] = std::array::from_fn(|v| simd.load(&row[v * lanes..]));
        for (acc, &x) in acc.iter_mut().zip(xs) {
            let x = simd.splat(x);
            for (acc, &b) in acc.iter_mut().zip(&bs) {
                *acc = simd.mul_add(x, b, *acc);
            }
        }
    }
    acc
}

/// B for [`broadcast_tiles`]: `width` values to a row, C's column j being B's column
/// `first_column + j`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    values: &'a [f32],
    width: usize,
    first_column: usize,
}

impl Rows<'_> {
    /// `len` values of row `kk` from C's column j on.
    #[inline(always)]
    fn row(&self, kk: usize, j: usize, len: usize) -> &[f32] {
        &self.values[kk * self.width + self.first_column + j..][..len]
    }
}

/// A for [`broadcast_tiles`]: `[tile][k][ROWS]` for its M rows.
#[derive(Clone, Copy)]
struct Packed<'a, const ROWS: usize> {
    values: &'a [f32],
    m: usize,
    k: usize,
}

impl<const ROWS: usize> Packed<'_, ROWS> {
    /// Each tile with the index of its first row over ROWS.
    #[inline(always)]
    fn tiles(&self) -> impl Iterator<Item = (usize, &[f32])> {
        self.values.chunks_exact(self.k * ROWS).enumerate()
    }
}

/// The columns `columns` of C (a multiple of VECTORS registers wide), a ROWS x VECTORS
/// tile of sums in registers at a time: each block of columns of B (K x VECTORS registers,
/// in L1) serves every tile of A in turn.
#[inline(always)]
fn block_columns<S: Simd, const ROWS: usize, const VECTORS: usize>(
    simd: S,
    alpha: f32,
    a: Packed<'_, ROWS>,
    b: Rows<'_>,
    columns: Range<usize>,
    beta: f32,
    c: &mut ArrayViewMut2<'_, f32>,
) {
    let lanes = S::LANES;
    let block = VECTORS * lanes;
    for j in columns.step_by(block) {
        for (t, tile) in a.tiles() {
            let acc = tile_sums::<S, ROWS, VECTORS>(simd, tile, |kk| b.row(kk, j, block));
            let first = t * ROWS;
            for (r, acc) in acc.iter().enumerate().take(a.m - first) {
                let mut out = c.row_mut(first + r);
                let out = out
                    .as_slice_mut()
                    .unwrap_or_else(|| unreachable!("rows were checked to be contiguous"));
                for (out, &sum) in out[j..j + block].chunks_exact_mut(lanes).zip(acc) {
                    store_vector(simd, out, alpha, sum, beta);
                }
            }
        }
    }
}

/// [`store`] for a register of sums: whole registers for a dense layer's `alpha` 1 and `beta`
/// 0 or 1 (the same roundings: `1 * s` and `1 * c` are exact), lane by lane otherwise.
#[inline(always)]
fn store_vector<S: Simd>(simd: S, out: &mut [f32], alpha: f32, sums: S::V, beta: f32) {
    match (alpha, beta) {
        (1.0, 0.0) => simd.store(sums, out),
        (1.0, 1.0) => simd.store(simd.add(simd.load(out), sums), out),
        _ => {
            let mut lanes = [0.0f32; 16];
            simd.store(sums, &mut lanes);
            for (out, &sum) in out.iter_mut().zip(&lanes) {
                store(out, alpha, sum, beta);
            }
        }
    }
}
