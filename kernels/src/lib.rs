//! Batched kernels for lorahost: quantized matmuls, paged attention and segmented LoRA on the CPU,
//! and segmented LoRA on NVIDIA GPUs (feature `cuda`).
//!
//! This crate owns the hot loops and nothing else: no model structure, no scheduling, no I/O.
//! Every fast kernel has a plain-loop reference twin that is its specification and its test oracle.

pub mod attention;
pub mod cuda;
pub mod error;
pub mod lora;
pub mod quant;

pub use error::KernelError;
