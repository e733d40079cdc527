//! ampserve: train encoder-decoder Transformer translation models with automatic mixed
//! precision (autocast, f32 master weights, dynamic loss scaling) and serve translations.
//!
//! Library modules `config`, `amp`, `ops`, `kernels`, `model`, `optim`, `data`, `generation`,
//! `checkpoint`, `scores`, `train`, `infer` never import tokio, sqlx or axum; the server (`store`, `artifacts`, `worker`, `http`) is built on
//! top of them.

pub mod amp;
pub mod app;
pub mod artifacts;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod client;
pub mod config;
pub mod counters;
pub mod data;
pub mod data_dir_lock;
pub mod experiment;
pub mod generation;
pub mod http;
pub mod import_marian;
pub mod infer;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod ops;
pub mod optim;
pub mod scores;
pub mod spec_overrides;
pub mod store;
pub mod tempfiles;
pub mod train;
pub mod worker;

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
