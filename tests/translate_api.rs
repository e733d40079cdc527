//! The translation API end to end with the REAL trainer: a tiny job succeeds and is exported
//! automatically; concurrent requests are batched and each gets the answer it gets alone; bad
//! input gets 4xx JSON errors naming the field; a full queue gives 429 with Retry-After; export
//! on demand; delete unloads.

mod common;

use ampserve::app::ServeArgs;
use ampserve::worker::CandleTrainer;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn job() -> Value {
    json!({
        "config": "tiny",
        "name": "translate-api",
        // the word-level fp32 setting, whatever the preset tunes: these bounds count words as tokens
        "data": {"max_train_pairs": 400, "tokenizer": "word", "joint_vocab": false},
        "model": {"d_model": 32, "layers": 1, "heads": 2, "d_ff": 64, "tie_embeddings": false},
        "train": {"precision": "fp32", "batch_size": 16, "max_steps": 40, "epochs": 1000, "warmup_steps": 10,
                  "valid_every": 20, "valid_max_sentences": 8, "valid_samples": 1},
        "checkpoint": {"every_steps": 20, "keep_last": 2}
    })
}

fn sentences() -> Vec<String> {
    let c = ampserve::data::read_tsv(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tatoeba-en-it/test.en-it.tsv"),
    )
    .unwrap();
    c.pairs.into_iter().map(|p| p.src).take(40).collect()
}

async fn wait_for_model(srv: &TestServer) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (s, v) = srv.get("/api/models").await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if let Some(m) = v["models"].as_array().and_then(|a| a.first()) {
            return m.clone();
        }
        assert!(Instant::now() < deadline, "no model was exported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_error(s: StatusCode, v: &Value, status: StatusCode, field: Option<&str>) {
    assert_eq!(s, status, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    if let Some(f) = field {
        assert_eq!(v["error"]["field"], f, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn translate_api_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let id = srv.submit(&job()).await;
    srv.wait_status(id, "succeeded").await;
    let model = wait_for_model(&srv).await;
    let mid = model["id"].as_i64().unwrap();
    assert_eq!(model["job_id"], id);
    assert_eq!(model["dtype"], "f16");
    assert_eq!(model["loaded"], false);
    assert!(model["files"]["model.safetensors"]["sha256"].is_string());
    let path = std::path::PathBuf::from(model["path"].as_str().unwrap());
    assert!(path.join("manifest.json").is_file());
    ampserve::infer::export::verify(&path).expect("the exported files verify");

    // 32 concurrent requests
    let texts = sentences();
    let mut handles = Vec::new();
    for t in texts.iter().take(32) {
        let t = t.clone();
        let c = srv.client.clone();
        let url = srv.url("/api/translate");
        handles.push(tokio::spawn(async move {
            let r = c
                .post(url)
                .json(&json!({"model": mid, "text": t}))
                .send()
                .await
                .unwrap();
            split(r).await
        }));
    }
    let mut together = Vec::new();
    for h in handles {
        let (s, v) = h.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["translations"].as_array().unwrap().len(), 1);
        together.push(v);
    }
    let (_, m) = srv.get(&format!("/api/models/{mid}")).await;
    assert_eq!(m["loaded"], true);
    let batches = m["runtime"]["batcher"]["batches"].as_u64().unwrap();
    let requests = m["runtime"]["batcher"]["requests"].as_u64().unwrap();
    eprintln!("32 concurrent requests were decoded in {batches} batches");
    assert_eq!(requests, 32);
    assert!(batches < 32, "{batches} decode batches for 32 requests");
    assert!(together
        .iter()
        .any(|v| v["timing"]["batch_size"].as_u64().unwrap() > 1));
    // each alone gets the same answer
    for (t, v) in texts.iter().take(32).zip(&together) {
        let (s, alone) = srv
            .post("/api/translate", &json!({"model": mid, "text": t}))
            .await;
        assert_eq!(s, StatusCode::OK, "{alone}");
        assert_eq!(alone["timing"]["batch_size"], 1);
        assert_eq!(
            alone["translations"][0]["text"], v["translations"][0]["text"],
            "`{t}`"
        );
        let text = alone["translations"][0]["text"].as_str().unwrap();
        assert!(!text.contains("[UNK]"), "`{text}`");
    }

    // texts, beam search, the GET form and the default model
    let (s, v) = srv
        .post(
            "/api/translate",
            &json!({"texts": [texts[0], texts[1], texts[2]], "beam_size": 4, "alpha": 0.6}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["model"], mid);
    assert_eq!(v["beam_size"], 4);
    assert_eq!(v["translations"].as_array().unwrap().len(), 3);
    for t in v["translations"].as_array().unwrap() {
        assert!(t["source_tokens"].as_u64().unwrap() > 0);
        assert!(t["score"].as_f64().unwrap() <= 0.0);
    }
    let (s, v) = srv
        .get(&format!(
            "/api/translate?model={mid}&text=I%20am%20here.&max_length=3"
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["translations"][0]["tokens"].as_u64().unwrap() <= 3);
    assert!(v["timing"]["total_ms"].as_f64().unwrap() > 0.0);

    // bad input
    let long = vec!["word"; 300].join(" ");
    let many: Vec<&str> = vec!["hello"; 65];
    for (body, status, field) in [
        (
            json!({"model": mid, "text": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("text"),
        ),
        (
            json!({"model": mid, "text": "   "}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("text"),
        ),
        (
            json!({"model": mid, "texts": []}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("texts"),
        ),
        (
            json!({"model": mid, "texts": many}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("texts"),
        ),
        (
            json!({"model": mid, "texts": ["ok", ""]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("texts[1]"),
        ),
        (
            json!({"model": mid, "text": long}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("text"),
        ),
        (
            json!({"model": mid}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("text"),
        ),
        (
            json!({"model": mid, "text": "a", "texts": ["b"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("texts"),
        ),
        (
            json!({"model": mid, "text": "a", "beam_size": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("beam_size"),
        ),
        (
            json!({"model": mid, "text": "a", "beam_size": 17}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("beam_size"),
        ),
        (
            json!({"model": mid, "text": "a", "alpha": 3.0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("alpha"),
        ),
        (
            json!({"model": mid, "text": "a", "max_length": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("max_length"),
        ),
        (
            json!({"model": mid, "text": "a", "beam": 2}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("beam"),
        ),
        (
            json!({"model": "one", "text": "a"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("model"),
        ),
        (
            json!({"model": 999, "text": "a"}),
            StatusCode::NOT_FOUND,
            Some("model"),
        ),
    ] {
        let (s, v) = srv.post("/api/translate", &body).await;
        assert_error(s, &v, status, field);
    }
    let (s, v) = srv.post_raw("/api/translate", "{\"text\": ").await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, None);
    let (s, v) = srv.get("/api/translate?model=999&text=hi").await;
    assert_error(s, &v, StatusCode::NOT_FOUND, Some("model"));
    let (s, v) = srv
        .get(&format!("/api/translate?model={mid}&beam_size=x&text=hi"))
        .await;
    assert_error(s, &v, StatusCode::UNPROCESSABLE_ENTITY, None);

    // export on demand
    let (s, v) = srv
        .post(
            &format!("/api/jobs/{id}/export?checkpoint=latest"),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let second = v["model"]["id"].as_i64().unwrap();
    assert_eq!(v["model"]["step"], 40);
    assert_ne!(second, mid);
    let (_, cks) = srv.get(&format!("/api/jobs/{id}/checkpoints")).await;
    let older = cks["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_i64().unwrap())
        .find(|&s| s != 40)
        .expect("an older checkpoint is retained");
    let (s, v) = srv
        .post(
            &format!("/api/jobs/{id}/export?checkpoint={older}"),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["model"]["step"], older);
    let (s, v) = srv
        .post(&format!("/api/jobs/{id}/export?checkpoint=7"), &json!({}))
        .await;
    assert_error(s, &v, StatusCode::CONFLICT, None);
    let (s, v) = srv
        .post(
            &format!("/api/jobs/{id}/export?checkpoint=newest"),
            &json!({}),
        )
        .await;
    assert_error(s, &v, StatusCode::UNPROCESSABLE_ENTITY, Some("checkpoint"));
    let (s, v) = srv.post("/api/jobs/999/export", &json!({})).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, None);
    let (_, v) = srv.get("/api/models").await;
    assert_eq!(v["models"].as_array().unwrap().len(), 3);

    // delete: unloaded, files gone, 404 afterwards
    let (s, _) = srv.delete(&format!("/api/models/{mid}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(!path.exists());
    let (s, v) = srv.get(&format!("/api/models/{mid}")).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, None);
    let (s, v) = srv
        .post("/api/translate", &json!({"model": mid, "text": "hello"}))
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND, Some("model"));
    srv.stop().await;

    // a queue of one: a burst is refused with 429 + Retry-After, the rest answered
    let args = ServeArgs {
        translate_queue: 1,
        ..args_for(dir.path())
    };
    let srv = TestServer::start(args, Arc::new(CandleTrainer)).await;
    let long_text = texts.iter().take(6).cloned().collect::<Vec<_>>().join(" ");
    let mut handles = Vec::new();
    for _ in 0..40 {
        let c = srv.client.clone();
        let url = srv.url("/api/translate");
        let body = json!({"model": second, "texts": [long_text, long_text], "beam_size": 16});
        handles.push(tokio::spawn(async move {
            let r = c.post(url).json(&body).send().await.unwrap();
            let retry = r.headers().get("retry-after").cloned();
            let (s, v) = split(r).await;
            (s, v, retry)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for h in handles {
        let (s, v, retry) = h.await.unwrap();
        match s {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert_eq!(v["error"]["code"], "overloaded", "{v}");
                assert!(retry.is_some(), "429 without Retry-After");
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    eprintln!("burst of 40 on a queue of 1: {ok} answered, {refused} refused");
    assert!(ok >= 1 && refused >= 1, "{ok} ok, {refused} refused");
    srv.stop().await;
}
