//! The crate's one error type: operands whose shapes or layouts do not fit a kernel.

/// Operands a kernel cannot work on, with the shapes involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    /// Operand shapes disagree, e.g. GEMM inner dimensions or a gradient's shape.
    #[error("shape mismatch in {op}: {detail}")]
    Shape {
        /// The kernel.
        op: &'static str,
        /// Which shapes, and what was expected.
        detail: String,
    },
    /// A hyper-parameter makes the operation impossible, e.g. a kernel larger than its input.
    #[error("invalid {op} configuration: {detail}")]
    Config {
        /// The kernel.
        op: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// An operand must be contiguous in row-major order and is not.
    #[error("{op}: {operand} must be in standard (row-major, contiguous) layout")]
    Layout {
        /// The kernel.
        op: &'static str,
        /// Which operand.
        operand: &'static str,
    },
}

/// Returns a shape error unless `actual == expected`.
pub(crate) fn expect_shape(
    op: &'static str,
    operand: &str,
    actual: &[usize],
    expected: &[usize],
) -> Result<(), TensorError> {
    if actual == expected {
        Ok(())
    } else {
        Err(TensorError::Shape {
            op,
            detail: format!("{operand} has shape {actual:?}, expected {expected:?}"),
        })
    }
}
