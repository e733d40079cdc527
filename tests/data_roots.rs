//! Where corpora come from: the sample bundled in `data/` is the default data root of the server
//! and of the presets, so a clone works with no folder beside it; `--data-root` points both at
//! other folders with the same layout (relative preset paths resolve against each root).

mod common;

use ampserve::config::TrainSpec;
use common::*;
use reqwest::StatusCode;
use serde_json::json;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    std::fs::canonicalize(env!("CARGO_MANIFEST_DIR")).unwrap()
}

/// A data root holding the first `n` lines of the bundled Tatoeba splits, in the same layout.
fn small_root(dir: &Path, n: usize) -> PathBuf {
    let root = dir.join("other-root");
    std::fs::create_dir_all(root.join("tatoeba-en-it")).unwrap();
    for f in ["train.en-it.tsv", "valid.en-it.tsv"] {
        let text = std::fs::read_to_string(repo().join("data/tatoeba-en-it").join(f)).unwrap();
        let head: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
        std::fs::write(root.join("tatoeba-en-it").join(f), head).unwrap();
    }
    std::fs::canonicalize(root).unwrap()
}

#[test]
fn the_bundled_sample_corpus_is_the_shared_tatoeba_split_unchanged() {
    let sums = std::fs::read_to_string(repo().join("data/SHA256SUMS")).unwrap();
    let mut files = 0;
    for line in sums.lines() {
        let (sha, rel) = line.split_once("  ").unwrap();
        assert_eq!(sha256_file(&repo().join("data").join(rel)), sha, "{rel}");
        let pairs = ampserve::data::read_tsv(&repo().join("data").join(rel)).unwrap();
        assert!(
            pairs.malformed.is_empty() && pairs.pairs.len() >= 1000,
            "{rel}"
        );
        files += 1;
    }
    assert_eq!(files, 3, "train, valid and test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_job_trains_on_the_bundled_sample_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::held_after(0)).await;
    let id = srv.submit(&json!({"config": "tiny"})).await;
    let spec = &srv.job(id).await["spec"];
    let bundled = repo().join("data/tatoeba-en-it");
    assert_eq!(
        spec["data"]["train"].as_str().unwrap(),
        bundled.join("train.en-it.tsv").to_str().unwrap()
    );
    assert_eq!(
        spec["data"]["valid"].as_str().unwrap(),
        bundled.join("valid.en-it.tsv").to_str().unwrap()
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_root_flag_serves_the_presets_from_that_folder_instead() {
    let dir = tempfile::tempdir().unwrap();
    let root = small_root(dir.path(), 50);
    let mut args = args_for(&dir.path().join("srv"));
    args.data_roots = vec![root.clone()];
    let srv = TestServer::start(args, FakeTrainer::held_after(0)).await;

    let id = srv.submit(&json!({"config": "tiny"})).await;
    let spec = &srv.job(id).await["spec"];
    assert_eq!(
        spec["data"]["train"].as_str().unwrap(),
        root.join("tatoeba-en-it/train.en-it.tsv").to_str().unwrap()
    );
    // The given roots replace the bundled one: its files are now outside the allowed roots.
    let bundled = repo().join("data/tatoeba-en-it/train.en-it.tsv");
    let (s, v) = srv
        .post("/api/jobs", &json!({"data": {"train": bundled}}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "data.train");
    // The refusal reads like any other (no server paths, no hint that the file exists).
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("not an allowed corpus file"), "{v}");
    assert!(!message.contains(bundled.to_str().unwrap()), "{v}");
    srv.stop().await;
}

#[test]
fn a_config_file_finds_its_corpus_in_data_roots_then_in_the_bundled_folder() {
    let tiny = repo().join("configs/tiny.toml");
    let spec = TrainSpec::from_toml_file(&tiny).unwrap();
    assert_eq!(
        std::fs::canonicalize(&spec.data.train).unwrap(),
        repo().join("data/tatoeba-en-it/train.en-it.tsv")
    );

    let dir = tempfile::tempdir().unwrap();
    let root = small_root(dir.path(), 20);
    let spec = TrainSpec::from_toml_file_in(&tiny, std::slice::from_ref(&root)).unwrap();
    assert_eq!(spec.data.train, root.join("tatoeba-en-it/train.en-it.tsv"));
    assert_eq!(
        spec.data.valid.as_deref(),
        Some(root.join("tatoeba-en-it/valid.en-it.tsv").as_path())
    );
}
