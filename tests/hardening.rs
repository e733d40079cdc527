//! Issue 13, the HTTP edge: hostile or careless input gets a clean 4xx naming the field, on the
//! real router over real HTTP (the fake trainer stands in for training: none of these jobs
//! should ever reach it).

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn assert_invalid(s: StatusCode, v: &Value, field: &str) {
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "invalid_value", "{v}");
    assert_eq!(v["error"]["field"], field, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_given_as_an_array_is_refused_naming_model() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::new();
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    for model in [json!([]), json!([48, 1, 2, 96])] {
        for preset in [None, Some("tiny")] {
            let mut body = json!({"name": "arr", "model": model});
            if let Some(p) = preset {
                body["config"] = json!(p);
            }
            let (s, v) = srv.post("/api/jobs", &body).await;
            assert_invalid(s, &v, "model");
            assert!(
                v["error"]["message"].as_str().unwrap().contains("object"),
                "{v}"
            );
        }
    }
    let (_, list) = srv.get("/api/jobs").await;
    assert_eq!(list["total"], 0, "no job was created: {list}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_object_in_any_spec_section_is_refused_naming_the_section() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    for (section, bad) in [
        ("data", json!("train.tsv")),
        ("train", json!([8, 1])),
        ("amp", json!(true)),
        ("checkpoint", json!(500)),
        ("model", Value::Null),
    ] {
        let body = json!({"config": "tiny", "name": "x", section: bad});
        let (s, v) = srv.post("/api/jobs", &body).await;
        assert_invalid(s, &v, section);
    }
    // A wrong scalar type inside a section names the dotted field.
    let (s, v) = srv
        .post(
            "/api/jobs",
            &json!({"config": "tiny", "model": {"d_model": [128]}}),
        )
        .await;
    assert_invalid(s, &v, "model.d_model");
    let (s, v) = srv
        .post(
            "/api/jobs",
            &json!({"config": "tiny", "train": {"batch_size": "8"}}),
        )
        .await;
    assert_invalid(s, &v, "train.batch_size");
    srv.stop().await;
}
