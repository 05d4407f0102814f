//! The sizes of one convolution and its output-size arithmetic.

use super::ConvAlgorithm;
use crate::error::TensorError;

/// How much zero padding surrounds the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// None: the output shrinks by the kernel size minus one (Keras' `valid`).
    Valid,
    /// Enough that the output is `ceil(input / stride)`, split with the extra row or column at
    /// the bottom or right (Keras' and TensorFlow's `same`).
    Same,
    /// Explicit zero rows and columns on each side.
    Explicit {
        /// Rows above.
        top: usize,
        /// Rows below.
        bottom: usize,
        /// Columns to the left.
        left: usize,
        /// Columns to the right.
        right: usize,
    },
}

/// Every size of one convolution: the one source of truth for output-size arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dDims {
    /// N.
    pub batch: usize,
    /// C.
    pub in_channels: usize,
    /// H.
    pub in_h: usize,
    /// W.
    pub in_w: usize,
    /// O.
    pub out_channels: usize,
    /// KH.
    pub kernel_h: usize,
    /// KW.
    pub kernel_w: usize,
    /// Vertical stride.
    pub stride_h: usize,
    /// Horizontal stride.
    pub stride_w: usize,
    /// Zero rows above the input.
    pub pad_top: usize,
    /// Zero rows below the input.
    pub pad_bottom: usize,
    /// Zero columns left of the input.
    pub pad_left: usize,
    /// Zero columns right of the input.
    pub pad_right: usize,
}

impl Conv2dDims {
    /// Dimensions for an input `[N, C, H, W]`, `out_channels` filters of `kernel` `[KH, KW]`,
    /// `stride` `[vertical, horizontal]` and `padding`.
    pub fn new(
        input: [usize; 4],
        out_channels: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: Padding,
    ) -> Result<Self, TensorError> {
        let [batch, in_channels, in_h, in_w] = input;
        let [kernel_h, kernel_w] = kernel;
        let [stride_h, stride_w] = stride;
        let config = |detail: String| TensorError::Config {
            op: "conv2d",
            detail,
        };
        if kernel_h == 0 || kernel_w == 0 || stride_h == 0 || stride_w == 0 {
            return Err(config(format!(
                "kernel {kernel:?} and stride {stride:?} must be at least 1"
            )));
        }
        if in_channels == 0 || out_channels == 0 {
            return Err(config(format!(
                "{in_channels} input and {out_channels} output channels: both must be at least 1"
            )));
        }
        // Sizes come from untrusted specs: every sum and product is checked, so a padding or
        // stride near usize::MAX is an error here rather than a wrapped size later.
        let overflow = || {
            config(format!(
                "input {in_h}x{in_w}, kernel {kernel:?}, stride {stride:?}, padding {padding:?}: \
                 the padded size overflows"
            ))
        };
        let same = |size: usize, k: usize, s: usize| {
            let out = size.div_ceil(s);
            let total = ((out.max(1) - 1).checked_mul(s)?.checked_add(k)?).saturating_sub(size);
            Some((total / 2, total - total / 2))
        };
        let (pad_top, pad_bottom, pad_left, pad_right) = match padding {
            Padding::Valid => (0, 0, 0, 0),
            Padding::Same => {
                let (top, bottom) = same(in_h, kernel_h, stride_h).ok_or_else(overflow)?;
                let (left, right) = same(in_w, kernel_w, stride_w).ok_or_else(overflow)?;
                (top, bottom, left, right)
            }
            Padding::Explicit {
                top,
                bottom,
                left,
                right,
            } => (top, bottom, left, right),
        };
        let padded_h = in_h
            .checked_add(pad_top)
            .and_then(|h| h.checked_add(pad_bottom))
            .ok_or_else(overflow)?;
        let padded_w = in_w
            .checked_add(pad_left)
            .and_then(|w| w.checked_add(pad_right))
            .ok_or_else(overflow)?;
        if padded_h < kernel_h || padded_w < kernel_w {
            return Err(config(format!(
                "kernel {kernel_h}x{kernel_w} is larger than the padded input {padded_h}x{padded_w}"
            )));
        }
        Ok(Conv2dDims {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            kernel_h,
            kernel_w,
            stride_h,
            stride_w,
            pad_top,
            pad_bottom,
            pad_left,
            pad_right,
        })
    }

    /// HP = H + pad_top + pad_bottom: the height of the zero-padded input.
    pub fn padded_h(&self) -> usize {
        self.in_h + self.pad_top + self.pad_bottom
    }

    /// WP = W + pad_left + pad_right: the width of the zero-padded input.
    pub fn padded_w(&self) -> usize {
        self.in_w + self.pad_left + self.pad_right
    }

    /// OH = (HP - KH) / stride_h + 1.
    pub fn out_h(&self) -> usize {
        (self.padded_h() - self.kernel_h) / self.stride_h + 1
    }

    /// OW = (WP - KW) / stride_w + 1.
    pub fn out_w(&self) -> usize {
        (self.padded_w() - self.kernel_w) / self.stride_w + 1
    }

    /// `[N, C, H, W]`.
    pub fn input_shape(&self) -> [usize; 4] {
        [self.batch, self.in_channels, self.in_h, self.in_w]
    }

    /// `[O, C, KH, KW]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels,
            self.kernel_h,
            self.kernel_w,
        ]
    }

    /// `[N, O, OH, OW]`.
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.out_channels, self.out_h(), self.out_w()]
    }

    /// C*KH*KW: the length of one receptive field, the rows of an unfolded image.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.kernel_h * self.kernel_w
    }

    /// The input channel and kernel tap `(c, kh, kw)` of row `r` of an unfolded image.
    pub fn tap_of_row(&self, r: usize) -> (usize, usize, usize) {
        let taps = self.kernel_h * self.kernel_w;
        let tap = r % taps;
        (r / taps, tap / self.kernel_w, tap % self.kernel_w)
    }

    /// OH*OW: the output pixels per channel, the columns of an unfolded image.
    pub fn out_pixels(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// The algorithm [`crate::Conv2dBuffers::default`] computes this convolution with.
    pub fn algorithm(&self) -> ConvAlgorithm {
        ConvAlgorithm::for_layer(
            self.in_channels,
            self.out_channels,
            [self.kernel_h, self.kernel_w],
            [self.stride_h, self.stride_w],
        )
    }

    /// Floating-point operations of the forward pass, 2*N*O*OH*OW*C*KH*KW (multiply and add).
    pub fn forward_flops(&self) -> u64 {
        2 * (self.batch * self.out_channels * self.out_pixels() * self.patch_len()) as u64
    }
}
