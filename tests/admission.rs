//! Issue 13, failure 1: a job whose memory cannot fit is refused with 422 before it is queued,
//! and the estimate it is judged by is checked against the peak RSS of real training runs.

mod common;

use ampserve::config::TrainSpec;
use ampserve::memory;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Duration;

fn assert_refused(s: StatusCode, v: &Value, field: &str) {
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], field, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs about"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issues_two_oversized_models_are_refused_naming_model() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::new();
    // Default limit: the memory this machine has available.
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    let huge = json!({"config": "tiny", "name": "huge",
        "model": {"d_model": 8192, "layers": 48, "heads": 8, "d_ff": 65536}});
    let (s, v) = srv.post("/api/jobs", &huge).await;
    assert_refused(s, &v, "model");
    srv.stop().await;

    // A server sized like a 32 GiB machine refuses the smaller one as well (46 GB of
    // parameter state alone).
    let mut args = args_for(dir.path());
    args.max_job_memory = Some(32 << 30);
    let srv = TestServer::start(args, fake.clone()).await;
    let big = json!({"config": "tiny", "name": "big",
        "model": {"d_model": 4096, "layers": 6, "heads": 16, "d_ff": 16384}});
    let (s, v) = srv.post("/api/jobs", &big).await;
    assert_refused(s, &v, "model");
    let (_, list) = srv.get("/api/jobs").await;
    assert_eq!(list["total"], 0, "{list}");
    assert!(fake.runs().is_empty());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_activations_do_not_fit_is_refused_naming_train_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args_for(dir.path());
    args.max_job_memory = Some(8 << 30);
    let srv = TestServer::start(args, FakeTrainer::new()).await;
    let body = |batch: u64| {
        json!({"config": "tiny", "name": "wide", "data": {"max_len": 1024},
               "train": {"batch_size": batch, "max_steps": 2}})
    };
    let (s, v) = srv.post("/api/jobs", &body(4096)).await;
    assert_refused(s, &v, "train.batch_size");
    let (s, v) = srv
        .post(
            "/api/jobs",
            &json!({"config": "tiny", "name": "wide", "data": {"max_len": 1024},
                    "train": {"max_tokens": 1_000_000, "max_steps": 2}}),
        )
        .await;
    assert_refused(s, &v, "train.max_tokens");
    // The same model with a small batch fits.
    let (s, v) = srv.post("/api/jobs", &body(4)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_job_memory_overrides_what_the_machine_has() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args_for(dir.path());
    args.max_job_memory = Some(64 << 20);
    let srv = TestServer::start(args, FakeTrainer::new()).await;
    let (s, v) = srv.post("/api/jobs", &fake_job("small")).await;
    assert_refused(s, &v, "model");
    srv.stop().await;
}

/// Peak RSS (VmHWM) of `ampserve train` on `spec`, polled from /proc until it exits.
fn measured_peak(spec_toml: &str, dir: &std::path::Path) -> u64 {
    let cfg = dir.join("spec.toml");
    std::fs::write(&cfg, spec_toml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ampserve"))
        .args(["train", "--json", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(dir.join("run"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            if let Some(kib) = text
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            {
                peak = peak.max(kib * 1024);
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "training failed: {st:?}");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    peak
}

#[test]
fn the_memory_estimate_is_within_a_factor_of_two_of_measured_peak_rss() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut ratios = Vec::new();
    // The estimate is for the worst case, every sentence at `max_len`; truncating Tatoeba's
    // short sentences at 12 tokens makes nearly every batch that worst case.
    for (name, d_model, d_ff, batch, max_len) in [
        ("small-batch", 32, 64, 8, 12),
        ("wide-batch", 256, 1024, 128, 12),
        ("wide-model", 512, 2048, 32, 12),
    ] {
        let toml = format!(
            r#"name = "{name}"
[data]
train = "{root}/data/tatoeba-en-it/train.en-it.tsv"
valid = "{root}/data/tatoeba-en-it/valid.en-it.tsv"
max_len = {max_len}
on_long = "truncate"
max_train_pairs = 2000
[model]
d_model = {d_model}
layers = 2
heads = 4
d_ff = {d_ff}
[train]
batch_size = {batch}
max_steps = 3
valid_max_sentences = 4
valid_samples = 1
[checkpoint]
every_steps = 0
"#
        );
        let spec = TrainSpec::from_toml_str(&toml).unwrap();
        let est = memory::estimate(&spec, memory::scan_corpus(&spec).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let peak = measured_peak(&toml, dir.path());
        let ratio = est.total_bytes() as f64 / peak as f64;
        eprintln!(
            "{name}: estimate {} ({est:?}), measured peak RSS {}, ratio {ratio:.2}",
            memory::human(est.total_bytes()),
            memory::human(peak)
        );
        ratios.push((name, ratio));
    }
    for (name, ratio) in ratios {
        assert!(
            (0.5..=2.0).contains(&ratio),
            "{name}: estimate / measured peak = {ratio:.2}"
        );
    }
}
