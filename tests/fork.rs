//! Fork (`POST /api/jobs/{id}/fork`) with the real trainer on the bundled Tatoeba en-it corpus:
//! a fork starts from its parent's checkpoint with the parent's exact weights, optimizer state
//! and data position, so with nothing changed it retraces the parent step for step; changed
//! settings take effect from its first update on; bad requests name the field.

mod common;

use ampserve::worker::CandleTrainer;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;

fn losses(points: &[Value]) -> Vec<(i64, f64)> {
    points
        .iter()
        .map(|p| (p["step"].as_i64().unwrap(), p["loss"].as_f64().unwrap()))
        .collect()
}

async fn finished_parent(srv: &TestServer) -> (i64, Vec<(i64, f64)>) {
    let id = srv.submit(&tiny_real_job("parent", 16, 8)).await;
    let job = srv.wait_status(id, "succeeded").await;
    assert_eq!(job["progress"]["step"], 16, "{job}");
    (id, losses(&srv.all_metrics(id).await))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_without_overrides_retraces_its_parent_from_the_checkpoint_step() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let (parent, parent_losses) = finished_parent(&srv).await;
    let (s, fork) = srv
        .post(
            &format!("/api/jobs/{parent}/fork"),
            &json!({"checkpoint": 8}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{fork}");
    assert_eq!(fork["parent_job_id"], parent);
    assert_eq!(fork["parent_checkpoint"], 8);
    let id = fork["id"].as_i64().unwrap();
    let job = srv.wait_status(id, "succeeded").await;
    assert_eq!(job["progress"]["resumed_from_step"], 8, "{job}");
    let fork_losses = losses(&srv.all_metrics(id).await);
    // the fork's rows are its own steps 9..=16, each with the parent's exact loss at that step:
    // same weights, Adam moments, scaler, data position and dropout masks
    assert_eq!(fork_losses, parent_losses[8..].to_vec());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_with_a_new_learning_rate_starts_from_the_parent_weights_and_then_diverges() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let (parent, parent_losses) = finished_parent(&srv).await;
    let body = json!({"checkpoint": "8", "overrides": {"name": "hot", "train": {"lr": 0.05, "schedule": "constant"}}});
    let (s, fork) = srv.post(&format!("/api/jobs/{parent}/fork"), &body).await;
    assert_eq!(s, StatusCode::CREATED, "{fork}");
    assert_eq!(fork["name"], "hot");
    assert_eq!(fork["spec"]["train"]["lr"], 0.05);
    let id = fork["id"].as_i64().unwrap();
    srv.wait_status(id, "succeeded").await;
    let fork_losses = losses(&srv.all_metrics(id).await);
    // step 9's loss is computed before the first update: the parent's weights exactly
    assert_eq!(fork_losses[0], parent_losses[8]);
    // from step 10 on the new learning rate shows
    assert_ne!(fork_losses[1], parent_losses[9]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_request_that_cannot_be_honoured_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let (parent, _) = finished_parent(&srv).await;
    let url = format!("/api/jobs/{parent}/fork");
    for (body, field) in [
        (json!({"checkpoint": 5}), "checkpoint"),
        (json!({"checkpoint": "newest"}), "checkpoint"),
        (
            json!({"overrides": {"model": {"d_model": 64}}}),
            "overrides.model",
        ),
        (
            json!({"overrides": {"data": {"max_len": 20}}}),
            "overrides.data",
        ),
        (
            json!({"overrides": {"train": {"lr": -1}}}),
            "overrides.train.lr",
        ),
        (
            json!({"overrides": {"train": {"batch_size": 4}}}),
            "overrides.train.batch_size",
        ),
        (
            json!({"overrides": {"amp": {"init_scale": "big"}}}),
            "overrides.amp.init_scale",
        ),
        (json!({"overides": {}}), "overides"),
    ] {
        let (s, v) = srv.post(&url, &body).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {v}");
        assert_eq!(v["error"]["field"], field, "{body} -> {v}");
    }
    let (s, v) = srv.post("/api/jobs/999/fork", &json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = srv.get("/api/jobs?limit=10").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["total"], 1, "no job was created by a refused fork: {v}");
    srv.stop().await;
}
