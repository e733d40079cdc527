//! End-to-end: the server with the REAL trainer (`train::run`) on Tatoeba en-it from
//! the bundled `data/`, tiny model.

mod common;

use ampserve::worker::CandleTrainer;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn tiny(name: &str, max_steps: u64) -> Value {
    json!({
        "config": "tiny",
        "name": name,
        "data": {"max_train_pairs": 300},
        "model": {"d_model": 32, "layers": 1, "heads": 2, "d_ff": 64},
        "train": {"batch_size": 16, "max_steps": max_steps, "epochs": 1000, "warmup_steps": 10,
                  "valid_every": 20, "valid_max_sentences": 20, "valid_samples": 2},
        "checkpoint": {"every_steps": 10, "keep_last": 2}
    })
}

fn steps(points: &[Value]) -> Vec<i64> {
    points.iter().map(|p| p["step"].as_i64().unwrap()).collect()
}

async fn assert_checkpoints_match_files(srv_get: (StatusCode, Value)) -> Vec<i64> {
    let (s, c) = srv_get;
    assert_eq!(s, StatusCode::OK, "{c}");
    let cks = c["checkpoints"].as_array().unwrap();
    assert!(!cks.is_empty());
    for ck in cks {
        let p = std::path::Path::new(ck["path"].as_str().unwrap());
        assert_eq!(ck["sha256"].as_str().unwrap(), sha256_file(p), "{ck}");
        assert_eq!(ck["size_bytes"], std::fs::metadata(p).unwrap().len());
    }
    cks.iter().map(|c| c["step"].as_i64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_tiny_job_succeeds_with_metrics_sse_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let id = srv.submit(&tiny("e2e-tiny", 40)).await;
    let sse = srv
        .client
        .get(srv.url(&format!("/api/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    let events = read_sse(sse).await;
    let job = srv.job(id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["progress"]["step"], 40);
    assert!(job["metrics"]["loss"].as_f64().unwrap().is_finite());
    assert!(job["metrics"]["bleu"].is_number());

    let sse_steps: Vec<i64> = events
        .iter()
        .filter(|e| e.0 == "step")
        .map(|e| e.1["step"].as_i64().unwrap())
        .collect();
    assert!(!sse_steps.is_empty());
    assert!(
        sse_steps.windows(2).all(|w| w[0] + 1 == w[1]),
        "{sse_steps:?}"
    );
    assert_eq!(*sse_steps.last().unwrap(), 40);
    assert!(events.iter().any(|e| e.0 == "validation"));
    assert!(events.iter().any(|e| e.0 == "checkpoint"));
    assert_eq!(events.last().unwrap().1["status"], "succeeded");

    let m = srv.all_metrics(id).await;
    assert_eq!(steps(&m), (1..=40).collect::<Vec<_>>());
    let first: f64 = m[..5]
        .iter()
        .map(|p| p["loss"].as_f64().unwrap())
        .sum::<f64>()
        / 5.0;
    let last: f64 = m[35..]
        .iter()
        .map(|p| p["loss"].as_f64().unwrap())
        .sum::<f64>()
        / 5.0;
    assert!(last < first, "loss should fall: {first} -> {last}");
    let (_, ds) = srv.get(&format!("/api/jobs/{id}/metrics?points=8")).await;
    let pts = ds["points"].as_array().unwrap();
    assert!(pts.len() <= 8);
    assert_eq!(pts.last().unwrap()["step"], 40);
    for p in pts {
        let (lo, hi, l) = (
            p["loss_min"].as_f64().unwrap(),
            p["loss_max"].as_f64().unwrap(),
            p["loss"].as_f64().unwrap(),
        );
        assert!(lo <= l && l <= hi);
    }
    let (_, v) = srv.get(&format!("/api/jobs/{id}/validations")).await;
    let vals = v["validations"].as_array().unwrap();
    assert!(!vals.is_empty());
    assert!(!vals[0]["samples"].as_array().unwrap().is_empty());
    let cks =
        assert_checkpoints_match_files(srv.get(&format!("/api/jobs/{id}/checkpoints")).await).await;
    assert_eq!(*cks.last().unwrap(), 40);
    // Persistence overhead: time spent writing step rows vs time spent training. The writes run
    // on tokio, not on the trainer thread, so this is CPU competition, not a stall.
    let w = srv.app.pool.write_stats();
    let train_s: f64 = m
        .iter()
        .map(|p| p["step_ms"].as_f64().unwrap())
        .sum::<f64>()
        / 1e3;
    eprintln!(
        "real run: {} steps, {:.1} ms/step; metric writes {} rows in {} flushes, {:.2} ms total \
         ({:.1} us/row, {:.3}% of training time)",
        m.len(),
        train_s * 1e3 / m.len() as f64,
        w.rows,
        w.flushes,
        w.seconds * 1e3,
        w.seconds * 1e6 / w.rows as f64,
        100.0 * w.seconds / train_s
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cancel_then_resume_continues_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let total = 400;
    let id = srv.submit(&tiny("e2e-cancel", total)).await;
    srv.wait_job(id, "a few steps", |j| {
        j["progress"]["step"].as_i64().unwrap() >= 5
    })
    .await;
    let sse = srv
        .client
        .get(srv.url(&format!("/api/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    let (s, v) = srv
        .post(&format!("/api/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let events = read_sse(sse).await;
    let job = srv.job(id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    let stopped = job["progress"]["step"].as_i64().unwrap();
    assert!(stopped < total as i64);
    // It stops within a few steps of the request.
    let after_cancel = events
        .iter()
        .skip_while(|e| e.1["status"] != "cancelling")
        .filter(|e| e.0 == "step")
        .count();
    assert!(
        after_cancel <= 10,
        "{after_cancel} steps after the cancel request"
    );
    let cks =
        assert_checkpoints_match_files(srv.get(&format!("/api/jobs/{id}/checkpoints")).await).await;
    assert_eq!(
        *cks.last().unwrap(),
        stopped,
        "the cancel wrote the latest checkpoint"
    );
    assert_eq!(
        steps(&srv.all_metrics(id).await),
        (1..=stopped).collect::<Vec<_>>()
    );

    // Resume, but cap the run so the test stays short.
    let (s, _) = srv
        .post(&format!("/api/jobs/{id}/resume"), &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK);
    srv.wait_job(id, "resumed", |j| {
        j["progress"]["step"].as_i64().unwrap() > stopped + 3
    })
    .await;
    let job = srv.job(id).await;
    assert_eq!(job["progress"]["resumed_from_step"], stopped);
    let (s, _) = srv
        .post(&format!("/api/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let job = srv.wait_status(id, "cancelled").await;
    let end = job["progress"]["step"].as_i64().unwrap();
    assert_eq!(
        steps(&srv.all_metrics(id).await),
        (1..=end).collect::<Vec<_>>()
    );
    srv.stop().await;
}

struct Server {
    child: Child,
    base: String,
}

fn spawn_server(data_dir: &std::path::Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ampserve"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--devices",
            "cpu",
            "--data-dir",
        ])
        .arg(data_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Logs go to stderr.
    let base = announced_base(&mut child, false);
    Server { child, base }
}

async fn get(c: &reqwest::Client, url: String) -> Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sigkill_then_restart_resumes_without_duplicate_steps() {
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();
    let mut srv = spawn_server(dir.path());
    let total = 150;
    let r = c
        .post(format!("{}/api/jobs", srv.base))
        .json(&tiny("e2e-crash", total))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    // Wait for a checkpoint and some steps past it, then SIGKILL.
    let deadline = Instant::now() + Duration::from_secs(600);
    let killed_at = loop {
        let cks = get(&c, format!("{}/api/jobs/{id}/checkpoints", srv.base)).await;
        let latest = cks["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["step"].as_i64().unwrap())
            .max();
        let job = get(&c, format!("{}/api/jobs/{id}", srv.base)).await;
        let step = job["progress"]["step"].as_i64().unwrap();
        if latest.is_some_and(|l| step > l + 2) {
            break step;
        }
        assert!(Instant::now() < deadline, "no checkpoint: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    srv.child.kill().unwrap(); // SIGKILL
    srv.child.wait().unwrap();

    let mut srv = spawn_server(dir.path());
    let job = loop {
        let job = get(&c, format!("{}/api/jobs/{id}", srv.base)).await;
        if job["status"] == "succeeded" {
            break job;
        }
        assert!(job["status"] != "failed", "{job}");
        assert!(Instant::now() < deadline, "never finished: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let resumed = job["progress"]["resumed_from_step"].as_i64().unwrap();
    assert!(
        resumed > 0 && resumed <= killed_at,
        "resumed from {resumed}, killed at {killed_at}"
    );
    assert_eq!(job["attempts"], 2);
    let m = get(
        &c,
        format!("{}/api/jobs/{id}/metrics?limit=100000", srv.base),
    )
    .await;
    assert_eq!(
        steps(m["points"].as_array().unwrap()),
        (1..=total as i64).collect::<Vec<_>>(),
        "no duplicated or missing step rows"
    );
    let cks = get(&c, format!("{}/api/jobs/{id}/checkpoints", srv.base)).await;
    for ck in cks["checkpoints"].as_array().unwrap() {
        let p = std::path::Path::new(ck["path"].as_str().unwrap());
        assert_eq!(ck["sha256"].as_str().unwrap(), sha256_file(p));
    }
    // SIGTERM: graceful stop.
    sigterm(&srv.child);
    let status = srv.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

fn sigterm(child: &Child) {
    // `kill -TERM` via the shell keeps the test free of libc.
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}
