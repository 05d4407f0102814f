//! A trainable tensor and its gradient, in one layout so the optimizer is one loop.

use ndarray::{ArrayD, IxDyn};

/// A trainable parameter: its value, the gradient accumulated since the last zeroing, and
/// whether any backward pass has written that gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// The value.
    pub value: ArrayD<f32>,
    /// The gradient, same shape, while `has_grad` is set: the first backward pass after
    /// [`Param::zero_grad`] overwrites it (its contents before are stale), later ones add to it.
    pub grad: ArrayD<f32>,
    /// Set by a backward pass, cleared by [`Param::zero_grad`]: a step without it is an error.
    pub has_grad: bool,
}

impl Param {
    /// A parameter with this value and a zero gradient.
    pub fn new(value: ArrayD<f32>) -> Param {
        let grad = ArrayD::zeros(value.raw_dim());
        Param {
            value,
            grad,
            has_grad: false,
        }
    }

    /// A parameter of zeros.
    pub fn zeros(shape: &[usize]) -> Param {
        Param::new(ArrayD::zeros(IxDyn(shape)))
    }

    /// Zeroes the gradient, before each batch's backward pass: marks it unwritten, so that the
    /// next backward pass overwrites it. (Filling it with zeros for the backward pass to add
    /// to cost one-conv two passes over its 2.2 MB dense-layer gradient per step.)
    pub fn zero_grad(&mut self) {
        self.has_grad = false;
    }

    /// The gradient for a backward pass to add to (zeros, after [`Param::zero_grad`]); marks
    /// it written.
    pub fn grad_to_add(&mut self) -> &mut ArrayD<f32> {
        self.value_and_grad_to_add().1
    }

    /// The value, and [`Param::grad_to_add`]: for a backward pass that reads the one while it
    /// adds to the other.
    pub fn value_and_grad_to_add(&mut self) -> (&ArrayD<f32>, &mut ArrayD<f32>) {
        if !self.has_grad {
            self.grad.fill(0.0);
            self.has_grad = true;
        }
        (&self.value, &mut self.grad)
    }

    /// The gradient for a backward pass to write as `grad = beta * grad + new`, and `beta`: 0
    /// after [`Param::zero_grad`] (the gradient is then overwritten, never read), else 1.
    /// Marks it written.
    pub fn grad_to_write(&mut self) -> (&mut ArrayD<f32>, f32) {
        let beta = if self.has_grad { 1.0 } else { 0.0 };
        self.has_grad = true;
        (&mut self.grad, beta)
    }

    /// Number of scalars.
    pub fn len(&self) -> usize {
        self.value.len()
    }

    /// Whether the parameter holds no scalars.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
}

/// A parameter tensor viewed with its fixed number of dimensions. Parameters keep the shape
/// they were built with (loading checks every shape), so a mismatch is a bug, reported as such.
pub(crate) fn fixed<'a, D: ndarray::Dimension>(
    a: &'a ArrayD<f32>,
    what: &'static str,
) -> Result<ndarray::ArrayView<'a, f32, D>, crate::NnError> {
    let shape = a.shape().to_vec();
    a.view()
        .into_dimensionality::<D>()
        .map_err(|_| bad_param_shape(what, shape))
}

/// The mutable counterpart of [`fixed`].
pub(crate) fn fixed_mut<'a, D: ndarray::Dimension>(
    a: &'a mut ArrayD<f32>,
    what: &'static str,
) -> Result<ndarray::ArrayViewMut<'a, f32, D>, crate::NnError> {
    let shape = a.shape().to_vec();
    a.view_mut()
        .into_dimensionality::<D>()
        .map_err(|_| bad_param_shape(what, shape))
}

fn bad_param_shape(what: &'static str, shape: Vec<usize>) -> crate::NnError {
    crate::NnError::Input {
        kind: what,
        detail: format!(
            "parameter has shape {shape:?}, not the number of dimensions the layer needs"
        ),
    }
}

/// The named parameter list of a layer with a weight and an optional bias.
pub(crate) fn weight_and_bias<'a>(
    weight: &'a Param,
    bias: Option<&'a Param>,
) -> Vec<(&'static str, &'a Param)> {
    std::iter::once(("weight", weight))
        .chain(bias.map(|b| ("bias", b)))
        .collect()
}

/// The mutable counterpart of [`weight_and_bias`].
pub(crate) fn weight_and_bias_mut<'a>(
    weight: &'a mut Param,
    bias: Option<&'a mut Param>,
) -> Vec<(&'static str, &'a mut Param)> {
    std::iter::once(("weight", weight))
        .chain(bias.map(|b| ("bias", b)))
        .collect()
}
