//! `train.max_time_s` through the server, with the real trainer on the bundled Tatoeba en-it
//! corpus: a job with a time budget (and a step cap it cannot reach) ends `succeeded` with a
//! validation and a checkpoint at its last step, and is exported for translation like any job
//! that finished its epochs. (The within-one-step bound is tests/stopping.rs.)

mod common;

use ampserve::worker::CandleTrainer;
use common::*;
use reqwest::StatusCode;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_out_of_time_succeeds_validated_checkpointed_and_exported() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let mut body = tiny_real_job("budget", 100_000, 0);
    body["train"]["max_time_s"] = 2.0.into();
    let id = srv.submit(&body).await;
    let job = srv.wait_status(id, "succeeded").await;
    let last = job["progress"]["step"].as_i64().unwrap();
    assert!(last > 0 && last < 100_000, "{job}");
    let (_, v) = srv.get(&format!("/api/jobs/{id}/validations")).await;
    let vals = v["validations"].as_array().unwrap();
    assert_eq!(vals.last().unwrap()["step"], last, "{v}");
    let (_, c) = srv.get(&format!("/api/jobs/{id}/checkpoints")).await;
    let cks = c["checkpoints"].as_array().unwrap();
    assert_eq!(cks.last().unwrap()["step"], last, "{c}");
    // The row turns `succeeded` just before the automatic export runs (its SSE status event
    // comes after the export), so a REST poller may look a moment too early.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let m = loop {
        let (s, m) = srv.get("/api/models").await;
        assert_eq!(s, StatusCode::OK);
        if !m["models"].as_array().unwrap().is_empty() || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let models = m["models"].as_array().unwrap();
    assert_eq!(models.len(), 1, "{m}");
    assert_eq!(models[0]["job_id"], id);
    srv.stop().await;
}
