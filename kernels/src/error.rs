//! The one error type of the kernels crate.

/// Why a kernel refused its input. Kernels never panic on shapes coming from outside.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("malformed quantized data: {0}")]
    Quant(String),
    /// The CUDA device or driver failed, or this build has no CUDA support.
    #[error("cuda: {0}")]
    Cuda(String),
}
