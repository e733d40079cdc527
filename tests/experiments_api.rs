//! `POST /api/experiments` and `GET /api/experiments[/{id}]` with the real trainer on the
//! bundled Tatoeba en-it corpus: an fp32 + f16 experiment runs both arms as jobs with the same
//! data order and initial weights and reports both arms' figures; bad requests name the field
//! and queue nothing.

mod common;

use ampserve::worker::CandleTrainer;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;

fn experiment(arms: Value, budget: Value) -> Value {
    let mut body = tiny_real_job("exp", 0, 0);
    body["train"].as_object_mut().unwrap().remove("max_steps");
    body["arms"] = arms;
    for (k, v) in budget.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn tokens(points: &[Value]) -> Vec<f64> {
    points
        .iter()
        .map(|p| {
            (p["tokens_per_s"].as_f64().unwrap() * p["step_ms"].as_f64().unwrap() / 1e3).round()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fp32_and_f16_experiment_reports_both_arms_from_the_same_start() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let (s, v) = srv
        .post(
            "/api/experiments",
            &experiment(json!(["fp32", "f16"]), json!({"max_steps": 6})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_i64().unwrap();
    let jobs: Vec<i64> = v["arms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["job_id"].as_i64().unwrap())
        .collect();
    assert_eq!(jobs.len(), 2);
    for j in &jobs {
        srv.wait_status(*j, "succeeded").await;
    }
    let (s, e) = srv.get(&format!("/api/experiments/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{e}");
    assert_eq!(e["status"], "finished", "{e}");
    assert_eq!(e["equal_step"], 6, "{e}");
    let arms = e["arms"].as_array().unwrap();
    assert_eq!(arms[0]["label"], "fp32");
    assert_eq!(arms[1]["label"], "f16");
    assert_eq!(arms[0]["speedup"], 1.0);
    for a in arms {
        assert_eq!(a["steps"], 6, "{a}");
        assert!(a["tokens_per_s"].as_f64().unwrap() > 0.0, "{a}");
        assert!(
            a["loss_at_equal_steps"].as_f64().unwrap().is_finite(),
            "{a}"
        );
        // null only for an arm whose first step outlasted another arm's whole run
        assert!(
            a["loss_at_equal_time"].is_null()
                || a["loss_at_equal_time"].as_f64().unwrap().is_finite(),
            "{a}"
        );
        assert!(
            a["bleu"].is_number() && a["chrf"].is_number() && a["val_loss"].is_number(),
            "{a}"
        );
        assert!(a["skipped_steps"].is_number(), "{a}");
        assert_eq!(a["peak_memory_source"], "estimated", "{a}");
        assert!(a["peak_memory_bytes"].as_u64().unwrap() > 0, "{a}");
    }
    assert!(arms.iter().any(|a| a["step_at_equal_time"] == 6), "{e}");
    assert!(arms[1]["speedup"].as_f64().unwrap() > 0.0);
    let verdict = arms[1]["verdict"].as_str().unwrap();
    assert!(
        verdict.starts_with("f16: ") && verdict.contains("BLEU"),
        "{verdict}"
    );
    assert_eq!(arms[1]["job_id"], jobs[1]);
    // the same data order and initial weights: equal batches, equal first-step losses up to
    // f16 rounding of the matmuls
    let a = srv.all_metrics(jobs[0]).await;
    let b = srv.all_metrics(jobs[1]).await;
    assert_eq!(tokens(&a), tokens(&b));
    let (la, lb) = (
        a[0]["loss"].as_f64().unwrap(),
        b[0]["loss"].as_f64().unwrap(),
    );
    assert!((la - lb).abs() / la < 1e-2, "fp32 {la} vs f16 {lb}");
    let (s, l) = srv.get("/api/experiments").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(l["total"], 1);
    assert_eq!(l["experiments"][0]["id"], id);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiment_request_that_cannot_run_names_the_field_and_queues_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), common::FakeTrainer::new()).await;
    let mut no_arms = experiment(json!([]), json!({"max_steps": 3}));
    no_arms.as_object_mut().unwrap().remove("arms");
    let mut bad_lr = experiment(json!(["fp32"]), json!({"max_steps": 3}));
    bad_lr["train"]["lr"] = json!(-1);
    for (body, field) in [
        (no_arms, "arms"),
        (experiment(json!(["fp32"]), json!({})), "max_steps"),
        (
            experiment(json!(["fp32"]), json!({"max_time_s": -2})),
            "max_time_s",
        ),
        (
            experiment(json!(["fp32", "fp4"]), json!({"max_steps": 3})),
            "arms[1]",
        ),
        (
            experiment(
                json!(["fp32", {"model": {"layers": 2}}]),
                json!({"max_steps": 3}),
            ),
            "arms[1].model",
        ),
        (
            experiment(json!([{"train": {"lr": 0}}]), json!({"max_steps": 3})),
            "arms[0].train.lr",
        ),
        (bad_lr, "train.lr"),
    ] {
        let (s, v) = srv.post("/api/experiments", &body).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {v}");
        assert_eq!(v["error"]["field"], field, "{body} -> {v}");
    }
    let (_, jobs) = srv.get("/api/jobs").await;
    assert_eq!(jobs["total"], 0, "{jobs}");
    let (s, _) = srv.get("/api/experiments/7").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    srv.stop().await;
}
