//! The `ampserve jobs|models|translate --server` client, run as the real binary against a real
//! test server (FakeTrainer): submit, list, show, watch following a running job to its end,
//! cancel, resume, delete, the token from AMPSERVE_API_TOKEN, and API errors as exit codes.

mod common;

use common::*;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn ampserve(base: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ampserve"));
    c.args(args)
        .env("AMPSERVE_SERVER", base)
        .env_remove("AMPSERVE_API_TOKEN")
        .env("RUST_LOG", "warn");
    c
}

async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_a_running_job_to_its_end_with_the_progress_line() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::held_after(10);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;

    let out = run(ampserve(
        &srv.base,
        &[
            "jobs",
            "submit",
            "--config",
            "tiny",
            "--name",
            "watched",
            "--max-steps",
            "60",
            "--body",
            r#"{"train": {"valid_every": 20}, "checkpoint": {"every_steps": 20}}"#,
        ],
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id: i64 = text(&out.stdout).trim().parse().unwrap();
    srv.wait_job(id, "step 10", |j| j["progress"]["step"] == 10)
        .await;

    // Start watching while the job is held at step 10; release it once watch has drawn that.
    let mut child = ampserve(&srv.base, &["jobs", "watch", &id.to_string()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !text(&seen).contains("10/60") {
        assert!(
            Instant::now() < deadline,
            "watch never drew step 10: {}",
            text(&seen)
        );
        if let Ok(b) = rx.recv_timeout(Duration::from_millis(50)) {
            seen.extend(b);
        }
    }
    fake.release();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    reader.join().unwrap();
    seen.extend(rx.try_iter().flatten());
    let err = text(&seen);
    assert!(status.success(), "{err}");
    // The same line as local training, drawn from live step events up to the last step.
    let last = err
        .split(['\r', '\n'])
        .rfind(|l| l.contains("60/60"))
        .unwrap_or_else(|| panic!("no final progress line in {err}"));
    assert!(
        last.starts_with("epoch 01: 100%|████████████████████| 60/60 ["),
        "{last}"
    );
    assert!(last.contains("it/s, loss="), "{last}");
    assert!(err.contains("valid @ step 40: loss"), "{err}");
    assert!(err.contains("checkpoint @ step 60"), "{err}");
    assert!(
        err.trim_end().ends_with(&format!("job {id} succeeded")),
        "{err}"
    );
    assert_eq!(srv.job(id).await["status"], "succeeded");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_cancel_resume_and_delete_drive_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::held_after(5);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    let id = srv.submit(&fake_job("from-cli")).await;
    srv.wait_status(id, "running").await;

    let out = run(ampserve(&srv.base, &["jobs", "list"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.contains("from-cli"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.trim_start().starts_with(&id.to_string()) && row.contains("running"),
        "{row}"
    );

    let out = run(ampserve(&srv.base, &["jobs", "show", &id.to_string()])).await;
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["id"], id);
    assert_eq!(shown["name"], "from-cli");

    let out = run(ampserve(&srv.base, &["jobs", "cancel", &id.to_string()])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    srv.wait_status(id, "cancelled").await;
    fake.release();
    let out = run(ampserve(&srv.base, &["jobs", "resume", &id.to_string()])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(ampserve(&srv.base, &["jobs", "watch", &id.to_string()])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(srv.job(id).await["status"], "succeeded");

    let out = run(ampserve(&srv.base, &["jobs", "delete", &id.to_string()])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("job {id} deleted"));
    let (s, _) = srv.get(&format!("/api/jobs/{id}")).await;
    assert_eq!(s, reqwest::StatusCode::NOT_FOUND);

    // An API error is a non-zero exit with the server's code, message and field.
    let out = run(ampserve(
        &srv.base,
        &["jobs", "submit", "--config", "tiny", "--precision", "f8"],
    ))
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("422") && err.contains("train.precision"),
        "{err}"
    );

    let out = run(ampserve(&srv.base, &["models", "list"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("0 models"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_comes_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args_for(dir.path());
    args.api_token = Some("s3cret".into());
    let srv = TestServer::start(args, FakeTrainer::held_after(0)).await;

    let out = run(ampserve(&srv.base, &["jobs", "submit", "--config", "tiny"])).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("401"), "{}", text(&out.stderr));

    let mut cmd = ampserve(&srv.base, &["jobs", "submit", "--config", "tiny"]);
    cmd.env("AMPSERVE_API_TOKEN", "s3cret");
    let out = run(cmd).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id: i64 = text(&out.stdout).trim().parse().unwrap();
    assert_eq!(srv.job(id).await["name"], "tiny-en-it");

    // translate --server sends to /api/translate: no model exported yet is the server's 404.
    let out = run(ampserve(
        &srv.base,
        &["translate", "--server", &srv.base, "Hello."],
    ))
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/api/translate"),
        "{}",
        text(&out.stderr)
    );
    srv.stop().await;
}
