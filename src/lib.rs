//! ampserve: train encoder-decoder Transformer translation models with automatic mixed
//! precision (autocast, f32 master weights, dynamic loss scaling) and serve translations.
//!
//! Library modules `config`, `amp`, `model`, `optim`, `data`, `train`, `infer` never import
//! tokio, sqlx or axum; the server (`store`, `worker`, `http`) is built on top of them.

pub mod config;
pub mod kernels;
pub mod train;
