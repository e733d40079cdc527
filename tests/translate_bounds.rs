//! Issue 13, failure 2: one translation request must not take gigabytes and keep them. A
//! request above the decode budget (source tokens × beam) is split across decode calls, a single
//! text above it gets 422, a request whose caller has gone is not decoded, and an idle server
//! gives the decode's memory back to the OS (measured on the real binary).

mod common;

use ampserve::app::ServeArgs;
use ampserve::worker::CandleTrainer;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn job() -> Value {
    json!({
        "config": "tiny",
        "name": "bounds",
        // the word-level fp32 setting, whatever the preset tunes: these bounds count words as tokens
        "data": {"max_train_pairs": 400, "tokenizer": "word", "joint_vocab": false},
        "model": {"d_model": 32, "layers": 1, "heads": 2, "d_ff": 64, "tie_embeddings": false},
        "train": {"precision": "fp32", "batch_size": 16, "max_steps": 2, "epochs": 1000, "warmup_steps": 100,
                  "valid_max_sentences": 4, "valid_samples": 1},
        "checkpoint": {"every_steps": 2, "keep_last": 1}
    })
}

/// `n` texts of `words` words each, from Tatoeba's test side (punctuation stripped, so one
/// word is one source token).
fn texts(n: usize, words: usize) -> Vec<String> {
    let c = ampserve::data::read_tsv(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tatoeba-en-it/test.en-it.tsv"),
    )
    .unwrap();
    let all: Vec<String> = c
        .pairs
        .iter()
        .flat_map(|p| {
            p.src
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric())
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .collect();
    (0..n)
        .map(|i| {
            let start = (i * 37) % (all.len() - words);
            all[start..start + words].join(" ")
        })
        .collect()
}

/// The issue's request: 64 texts of 58 words at beam 16. (The job trains two steps: the model
/// is still near its random start, so hypotheses run to the length cap, the costly case.)
fn issue_request(model: i64) -> Value {
    json!({"model": model, "texts": texts(64, 58), "beam_size": 16})
}

async fn wait_for_model(c: &reqwest::Client, base: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let v: Value = c
            .get(format!("{base}/api/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(id) = v["models"][0]["id"].as_i64() {
            return id;
        }
        assert!(Instant::now() < deadline, "no model was exported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_text_above_the_decode_budget_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let args = ServeArgs {
        translate_batch_tokens: 64,
        ..args_for(dir.path())
    };
    let srv = TestServer::start(args, Arc::new(CandleTrainer)).await;
    srv.submit(&job()).await;
    let model = wait_for_model(&srv.client, &srv.base).await;
    // 20 words fit alone (22 × 1) but not at beam 4 (22 × 4 = 88 > 64).
    let (s, v) = srv
        .post(
            "/api/translate",
            &json!({"model": model, "text": texts(1, 20)[0], "beam_size": 4}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "beam_size", "{v}");
    // 63 words do not fit even greedily (65 > 64): the text itself is named.
    let (s, v) = srv
        .post(
            "/api/translate",
            &json!({"model": model, "texts": [texts(1, 3)[0], texts(1, 63)[0]]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "texts[1]", "{v}");
    // Ten texts that each fit are split across calls and all answered.
    let (s, v) = srv
        .post(
            "/api/translate",
            &json!({"model": model, "texts": texts(10, 10), "beam_size": 2}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["translations"].as_array().unwrap().len(), 10);
    assert!(v["timing"]["decode_calls"].as_u64().unwrap() >= 4, "{v}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_timed_out_is_dropped_not_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let args = ServeArgs {
        request_timeout_s: 1,
        ..args_for(dir.path())
    };
    let srv = TestServer::start(args, Arc::new(CandleTrainer)).await;
    srv.submit(&job()).await;
    let model = wait_for_model(&srv.client, &srv.base).await;
    let (s, v) = srv
        .post("/api/translate", &json!({"model": model, "text": "hello"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Eight decode calls' worth of work behind a one-second timeout.
    let (s, v) = srv.post("/api/translate", &issue_request(model)).await;
    assert_eq!(s, StatusCode::REQUEST_TIMEOUT, "{v}");
    // The batcher notices at its next call and stops; nothing is answered for it.
    let deadline = Instant::now() + Duration::from_secs(300);
    let stats = loop {
        let (_, m) = srv.get(&format!("/api/models/{model}")).await;
        let b = m["runtime"]["batcher"].clone();
        if b["dropped"].as_u64().unwrap_or(0) >= 1 {
            break b;
        }
        assert!(Instant::now() < deadline, "never dropped: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stats["requests"], 2, "{stats}");
    assert_eq!(
        stats["sentences"], 1,
        "only the first request was answered: {stats}"
    );
    let (s, _) = srv
        .post("/api/translate", &json!({"model": model, "text": "hello"}))
        .await;
    assert_eq!(s, StatusCode::OK, "the batcher serves on");
    srv.stop().await;
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        .env_remove("MIMALLOC_PURGE_DELAY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Logs go to stderr.
    let base = announced_base(&mut child, false);
    Server { child, base }
}

fn rss(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issues_beam_16_request_is_split_and_its_memory_returns_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let srv = spawn_server(dir.path());
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{}/api/jobs", srv.base))
        .json(&job())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let model = wait_for_model(&c, &srv.base).await;
    let url = format!("{}/api/translate", srv.base);
    let r = c
        .post(&url)
        .json(&json!({"model": model, "text": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = srv.child.id();
    let before = rss(pid);
    // Sample the resident size while the request runs.
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let r = c
        .post(&url)
        .json(&issue_request(model))
        .send()
        .await
        .unwrap();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let (s, v) = split(r).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["translations"].as_array().unwrap().len(), 64);
    let calls = v["timing"]["decode_calls"].as_u64().unwrap();
    // (58 + 2) × 16 = 960 per text: eight texts per 8192-token call.
    assert_eq!(calls, 8, "{}", v["timing"]);
    assert!(v["translations"][0]["source_tokens"] == 58, "{v}");
    let peak = peak.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss(pid);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "RSS before {:.0} MiB, peak during the request {:.0} MiB, after 3 s idle {:.0} MiB",
        mib(before),
        mib(peak),
        mib(after)
    );
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 512 << 20,
        "the request took {:.0} MiB",
        mib(growth)
    );
    assert!(
        after <= before + growth / 2 + (16 << 20),
        "idle RSS {:.0} MiB did not fall back towards {:.0} MiB (peak {:.0} MiB)",
        mib(after),
        mib(before),
        mib(peak)
    );
}
