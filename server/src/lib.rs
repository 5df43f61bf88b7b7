//! lorahost: a multi-adapter LLM inference host. This library holds the model, the engine, the
//! tokenizer and chat templates, and the command-line front end; `main.rs` only dispatches.

pub mod adapter_host;
pub mod base;
pub mod chat;
pub mod cli;
pub mod engine;
pub mod fetch;
pub mod http;
pub mod jobs;
pub mod model;
pub mod runtime;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;
pub mod train;
