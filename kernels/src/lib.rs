//! Batched CPU kernels for lorahost: quantized matmuls, paged attention and (later) segmented LoRA.
//!
//! This crate owns the hot loops and nothing else: no model structure, no scheduling, no I/O.
//! Every fast kernel has a plain-loop reference twin that is its specification and its test oracle.

pub mod attention;
pub mod error;
pub mod lora;
pub mod quant;

pub use error::KernelError;
