//! Which algorithm computes a convolution: chosen once from the layer's shape, overridable.

use std::fmt;

use super::Conv2dDims;
use super::direct::MAX_PATCH;
use super::implicit::CHANNEL_BLOCK;

/// How a convolution is computed. Every algorithm gives the same results up to rounding; each
/// gives the same bits whatever the number of threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvAlgorithm {
    /// Sums of shifted input planes (`direct`): for stride 1 and receptive fields of at most
    /// 32 values (a first layer's 1x3x3 or 1x5x5), where a GEMM with so short an inner
    /// dimension spends its time packing.
    Direct,
    /// A GEMM reading receptive fields in place from a channels-last copy of the input
    /// (`implicit`): for output channels in multiples of 16, which its register tiles cover.
    ImplicitGemm,
    /// im2col + GEMM (`im2col`): any shape.
    Im2colGemm,
}

impl ConvAlgorithm {
    /// Every algorithm, for tests and benches that try each.
    pub const ALL: [ConvAlgorithm; 3] = [
        ConvAlgorithm::Direct,
        ConvAlgorithm::ImplicitGemm,
        ConvAlgorithm::Im2colGemm,
    ];

    /// The fastest algorithm for a convolution of this shape. It depends on the channels,
    /// kernel and stride only, never on the batch or image size, so a layer chooses once.
    pub fn for_layer(
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
    ) -> ConvAlgorithm {
        let patch = in_channels * kernel[0] * kernel[1];
        if stride == [1, 1] && patch <= MAX_PATCH {
            ConvAlgorithm::Direct
        } else if out_channels.is_multiple_of(CHANNEL_BLOCK) {
            ConvAlgorithm::ImplicitGemm
        } else {
            ConvAlgorithm::Im2colGemm
        }
    }

    /// Whether this algorithm can compute a convolution of these dimensions at all (if not,
    /// why): [`Self::Direct`] needs stride 1 and at most 32 receptive-field values,
    /// [`Self::ImplicitGemm`] output channels in multiples of 16.
    pub fn supports(self, dims: &Conv2dDims) -> Result<(), String> {
        match self {
            ConvAlgorithm::Direct
                if (dims.stride_h, dims.stride_w) != (1, 1) || dims.patch_len() > MAX_PATCH =>
            {
                Err(format!(
                    "the direct convolution needs stride 1 and at most {MAX_PATCH} \
                     receptive-field values, not stride {}x{} and {}",
                    dims.stride_h,
                    dims.stride_w,
                    dims.patch_len()
                ))
            }
            ConvAlgorithm::ImplicitGemm if !dims.out_channels.is_multiple_of(CHANNEL_BLOCK) => {
                Err(format!(
                    "the implicit GEMM needs output channels in multiples of {CHANNEL_BLOCK}, \
                     not {}",
                    dims.out_channels
                ))
            }
            _ => Ok(()),
        }
    }

    /// A short name, as `summary --verbose` and the profiler print it.
    pub fn name(self) -> &'static str {
        match self {
            ConvAlgorithm::Direct => "direct",
            ConvAlgorithm::ImplicitGemm => "implicit-gemm",
            ConvAlgorithm::Im2colGemm => "im2col-gemm",
        }
    }
}

impl fmt::Display for ConvAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
