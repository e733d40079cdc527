//! Issue 13, failures 3, 4, 5 and 7: concurrent uploads and exports never share temp files,
//! a model deleted while it loads gives its waiting translations 404 (never 500), and what a
//! crash left half-written is swept at start.

mod common;

use ampserve::worker::ProcessTrainer;
use common::*;
use reqwest::StatusCode;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

const TATOEBA: &str = "data/tatoeba-en-it/train.en-it.tsv";

fn corpus_lines(skip: usize, take: usize) -> String {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(TATOEBA))
        .expect("the bundled Tatoeba corpus in data/");
    let mut s: String = text
        .lines()
        .skip(skip)
        .take(take)
        .collect::<Vec<_>>()
        .join("\n");
    s.push('\n');
    s
}

fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(".upload-") || n.contains(".partial") {
            out.push(n);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_uploads_of_one_name_keep_one_intact_corpus_and_answer_409_to_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let a = corpus_lines(0, 3000);
    let b = corpus_lines(3000, 2500);
    for round in 0..8 {
        let name = format!("same{round}");
        let url = srv.url(&format!("/api/corpora?name={name}&src_lang=en&tgt_lang=it"));
        let send = |body: String| {
            let (c, url) = (srv.client.clone(), url.clone());
            tokio::spawn(async move { split(c.post(url).body(body).send().await.unwrap()).await })
        };
        let (ra, rb) = (send(a.clone()), send(b.clone()));
        let (ra, rb) = (ra.await.unwrap(), rb.await.unwrap());
        let mut codes = [ra.0, rb.0];
        codes.sort();
        assert_eq!(
            codes,
            [StatusCode::CREATED, StatusCode::CONFLICT],
            "{ra:?} {rb:?}"
        );
        let winner = if ra.0 == StatusCode::CREATED {
            &ra.1
        } else {
            &rb.1
        };
        let stored = std::fs::read(winner["corpus"]["path"].as_str().unwrap()).unwrap();
        assert!(
            stored == a.as_bytes() || stored == b.as_bytes(),
            "round {round}: the stored corpus is neither upload ({} bytes, {} NUL)",
            stored.len(),
            stored.iter().filter(|&&c| c == 0).count()
        );
        let expect_lines = if stored == a.as_bytes() { 3000 } else { 2500 };
        assert_eq!(winner["corpus"]["lines"], expect_lines);
    }
    assert_eq!(leftovers(&dir.path().join("corpora")), Vec::<String>::new());
    srv.stop().await;
}

/// A real tiny job run to success in its own process; returns the job id.
async fn finished_real_job(srv: &TestServer, name: &str) -> i64 {
    let id = srv.submit(&tiny_real_job(name, 30, 10)).await;
    srv.wait_status(id, "succeeded").await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_concurrent_exports_of_one_job_all_get_the_same_model_and_leave_no_partial() {
    let dir = tempfile::tempdir().unwrap();
    let trainer = Arc::new(ProcessTrainer::new(env!("CARGO_BIN_EXE_ampserve")));
    let srv = TestServer::start(args_for(dir.path()), trainer).await;
    let id = finished_real_job(&srv, "exports").await;
    let mut handles = Vec::new();
    for _ in 0..6 {
        let (c, url) = (
            srv.client.clone(),
            srv.url(&format!("/api/jobs/{id}/export?checkpoint=latest")),
        );
        handles.push(tokio::spawn(async move {
            split(c.post(url).send().await.unwrap()).await
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        let (s, v) = h.await.unwrap();
        assert_eq!(s, StatusCode::CREATED, "{v}");
        ids.push(v["model"]["id"].as_i64().unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one export, shared: {ids:?}");
    let (_, m) = srv.get(&format!("/api/models/{}", ids[0])).await;
    ampserve::infer::export::verify(Path::new(m["path"].as_str().unwrap()))
        .expect("the exported files verify");
    assert_eq!(leftovers(&dir.path().join("models")), Vec::<String>::new());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_model_while_translations_wait_for_it_to_load_gives_them_404_never_500() {
    let dir = tempfile::tempdir().unwrap();
    let trainer = Arc::new(ProcessTrainer::new(env!("CARGO_BIN_EXE_ampserve")));
    let srv = TestServer::start(args_for(dir.path()), trainer).await;
    let id = finished_real_job(&srv, "deleted").await;
    let mut saw_404 = 0;
    for round in 0..6 {
        let (s, v) = srv
            .post(
                &format!("/api/jobs/{id}/export?checkpoint=latest"),
                &json!({}),
            )
            .await;
        // each round exports a fresh model: the previous one was deleted
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let mid = v["model"]["id"].as_i64().unwrap();
        let mut handles = Vec::new();
        for _ in 0..6 {
            let (c, url) = (srv.client.clone(), srv.url("/api/translate"));
            handles.push(tokio::spawn(async move {
                let body = json!({"model": mid, "text": "I like to read books."});
                split(c.post(url).json(&body).send().await.unwrap()).await
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(round)).await;
        let (s, _) = srv.delete(&format!("/api/models/{mid}")).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        for h in handles {
            let (s, v) = h.await.unwrap();
            match s {
                StatusCode::OK => assert!(
                    v["translations"].is_array() || v["translation"].is_string(),
                    "{v}"
                ),
                StatusCode::NOT_FOUND => {
                    saw_404 += 1;
                    assert_eq!(v["error"]["field"], "model", "{v}");
                }
                other => panic!("round {round}: {other} {v}"),
            }
        }
    }
    eprintln!("{saw_404} translations answered 404 after the delete");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_crash_are_swept_at_start_and_real_files_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ck = root.join("runs/7/checkpoints");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::create_dir_all(root.join("corpora")).unwrap();
    std::fs::create_dir_all(root.join("models/.job7-latest-1-2-3.partial-4-5-6")).unwrap();
    let corpus = corpus_lines(0, 50);
    let junk = [
        "corpora/.upload-mine-123-0-99",
        "runs/7/spec.tmp-write",
        "runs/7/checkpoints/step-00000020.safetensors",
        "runs/7/checkpoints/step-00000030.safetensors.tmp",
    ];
    let kept = [
        "corpora/mine.en-it.tsv",
        "runs/7/checkpoints/step-00000010.safetensors",
        "runs/7/checkpoints/step-00000010.json",
    ];
    for f in junk.iter().chain(&kept) {
        std::fs::write(root.join(f), &corpus).unwrap();
    }
    let srv = TestServer::start(args_for(root), FakeTrainer::new()).await;
    for f in junk {
        assert!(!root.join(f).exists(), "{f} was not swept");
    }
    assert!(!root
        .join("models/.job7-latest-1-2-3.partial-4-5-6")
        .exists());
    for f in kept {
        assert!(root.join(f).exists(), "{f} was removed");
    }
    srv.stop().await;
}
