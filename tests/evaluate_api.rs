//! `POST /api/models/{id}/evaluate` with the REAL trainer: a tiny job is exported, its test split
//! is translated and scored exactly as `evaluate_tsv` scores it, and the score is kept with the
//! model; bad requests get 4xx JSON errors naming the field.

mod common;

use ampserve::worker::CandleTrainer;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn job() -> Value {
    json!({
        "config": "tiny",
        "name": "evaluate-api",
        "data": {"max_train_pairs": 400},
        "model": {"d_model": 32, "layers": 1, "heads": 2, "d_ff": 64},
        "train": {"batch_size": 16, "max_steps": 40, "epochs": 1000, "warmup_steps": 10,
                  "valid_max_sentences": 8, "valid_samples": 1},
        "checkpoint": {"every_steps": 20, "keep_last": 2}
    })
}

async fn trained_model(srv: &TestServer) -> Value {
    let id = srv.submit(&job()).await;
    srv.wait_status(id, "succeeded").await;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (_, v) = srv.get("/api/models").await;
        if let Some(m) = v["models"].as_array().and_then(|a| a.first()) {
            return m.clone();
        }
        assert!(Instant::now() < deadline, "no model was exported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evaluating_the_test_split_scores_it_like_evaluate_tsv_and_keeps_the_score() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let m = trained_model(&srv).await;
    let mid = m["id"].as_i64().unwrap();
    let (s, v) = srv
        .post(
            &format!("/api/models/{mid}/evaluate"),
            &json!({"split": "test"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let test = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/tatoeba-en-it/test.en-it.tsv");
    let t = ampserve::infer::Translator::load(
        &PathBuf::from(m["path"].as_str().unwrap()),
        &candle_core::Device::Cpu,
        None,
    )
    .unwrap();
    let (want, _) = ampserve::infer::evaluate_tsv(&t, &test, 1, 32).unwrap();
    assert_eq!(v["report"]["sentences"], want.sentences as u64);
    assert!(want.sentences > 1000);
    let bleu = v["evaluation"]["bleu"].as_f64().unwrap();
    let chrf = v["evaluation"]["chrf"].as_f64().unwrap();
    assert!((bleu - want.bleu).abs() < 1e-9, "{bleu} vs {}", want.bleu);
    assert!((chrf - want.chrf).abs() < 1e-9 && chrf > 0.0);
    assert!(v["evaluation"]["corpus"]
        .as_str()
        .unwrap()
        .ends_with("test.en-it.tsv"));

    let (s, list) = srv.get(&format!("/api/models/{mid}/evaluations")).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    assert_eq!(list["evaluations"].as_array().unwrap().len(), 1);
    assert_eq!(list["evaluations"][0]["bleu"].as_f64(), Some(bleu));
    // and the model view (what the status page's translate view shows) carries it
    let (_, mv) = srv.get(&format!("/api/models/{mid}")).await;
    assert_eq!(mv["evaluations"][0]["chrf"].as_f64(), Some(chrf), "{mv}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_evaluation_requests_get_errors_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let m = trained_model(&srv).await;
    let url = format!("/api/models/{}/evaluate", m["id"]);
    for (body, field) in [
        (json!({}), "corpus"),
        (json!({"split": "dev"}), "split"),
        (json!({"corpus": "/etc/passwd"}), "corpus"),
        (json!({"split": "test", "beam_size": 0}), "beam_size"),
        (json!({"split": "test", "beams": 2}), "beams"),
    ] {
        let (s, v) = srv.post(&url, &body).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
    }
    let (s, v) = srv
        .post("/api/models/999/evaluate", &json!({"split": "test"}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    srv.stop().await;
}
