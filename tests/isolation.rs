//! Issue 13, failures 1 and 6: each training job runs in its own process of the real binary.
//! A child that dies fails only its job (with the cause in words); a job that keeps crashing
//! the server is failed after `--max-attempts`; a SIGKILL never leaves gaps in the metrics.

mod common;

use ampserve::worker::ProcessTrainer;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(300)
}

/// The pid of the process running job `id`'s run directory.
async fn runner_pid(trainer: &ProcessTrainer, srv: &TestServer, id: i64) -> u32 {
    let until = deadline();
    loop {
        let j = srv.job(id).await;
        if j["progress"]["step"].as_i64().unwrap_or(0) >= 2 {
            if let Some((_, pid)) = trainer
                .children()
                .into_iter()
                .find(|(dir, _)| dir.ends_with(id.to_string()))
            {
                return pid;
            }
        }
        assert!(Instant::now() < until, "job {id} never ran: {j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn killed_child_fails_job_and_next_runs(sig: &str, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let trainer = Arc::new(ProcessTrainer::new(env!("CARGO_BIN_EXE_ampserve")));
    let srv = TestServer::start(args_for(dir.path()), trainer.clone()).await;
    let doomed = srv.submit(&tiny_real_job("doomed", 100_000, 50)).await;
    let next = srv.submit(&tiny_real_job("next", 12, 6)).await;
    let pid = runner_pid(&trainer, &srv, doomed).await;
    assert!(signal(pid, sig));
    let j = srv.wait_status(doomed, "failed").await;
    let err = j["error"].as_str().unwrap();
    assert!(err.contains(expect), "{err}");
    let (s, _) = srv.get("/healthz").await;
    assert_eq!(s, StatusCode::OK, "the server answers");
    let j = srv.wait_status(next, "succeeded").await;
    assert_eq!(j["progress"]["step"], 12, "{j}");
    assert_eq!(
        metric_steps(&json!({"points": srv.all_metrics(next).await})),
        (1..=12).collect::<Vec<_>>()
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_process_killed_by_sigkill_fails_its_job_with_the_cause_and_the_next_job_runs() {
    killed_child_fails_job_and_next_runs(
        "KILL",
        "the training process was killed by signal 9 (SIGKILL; out of memory?)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_process_that_aborts_fails_its_job_with_sigabrt_and_the_next_job_runs() {
    killed_child_fails_job_and_next_runs("ABRT", "killed by signal 6 (SIGABRT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_through_max_attempts_server_crashes_is_failed_not_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();
    let args = ["--max-attempts", "2"];
    let srv = spawn_bin_server(dir.path(), &args);
    let (s, v) = srv
        .post(&c, "/api/jobs", &tiny_real_job("crash-loop", 100_000, 50))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_i64().unwrap();
    let mut srv = srv;
    for attempt in 1..=2 {
        let until = deadline();
        loop {
            let j = srv.get(&c, &format!("/api/jobs/{id}")).await;
            // (the step shown may still be the previous attempt's until the new one reports)
            if j["status"] == "running" && !child_pids(srv.child.id()).is_empty() {
                assert_eq!(j["attempts"], attempt, "{j}");
                break;
            }
            assert!(Instant::now() < until, "never running: {j}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let runners = child_pids(srv.child.id());
        assert_eq!(runners.len(), 1, "one training process: {runners:?}");
        srv.kill();
        // The training process does not outlive its server.
        let until = Instant::now() + Duration::from_secs(10);
        while process_alive(runners[0]) {
            assert!(Instant::now() < until, "orphaned training process");
            std::thread::sleep(Duration::from_millis(20));
        }
        srv = spawn_bin_server(dir.path(), &args);
    }
    let j = srv.get(&c, &format!("/api/jobs/{id}")).await;
    assert_eq!(j["status"], "failed", "{j}");
    let err = j["error"].as_str().unwrap();
    assert!(
        err.contains("crashed 2 times") && err.contains("--max-attempts 2"),
        "{err}"
    );
    assert_eq!(j["attempts"], 2, "not started a third time");
    // A user can still resume it.
    let (s, v) = srv
        .post(&c, &format!("/api/jobs/{id}/resume"), &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    srv.kill();
}

/// Newest checkpoint sidecar step in a run directory (the real trainer's `step-N.json`).
fn newest_checkpoint(dir: &std::path::Path) -> Option<u64> {
    std::fs::read_dir(dir.join("checkpoints"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("step-")?.strip_suffix(".json")?.parse().ok()
        })
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_the_moment_a_checkpoint_appears_leaves_exactly_one_metric_row_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::new();
    let total = 120;
    let mut srv = spawn_bin_server(dir.path(), &["--max-attempts", "100"]);
    let (s, v) = srv
        .post(&c, "/api/jobs", &tiny_real_job("ckpt-kill", total, 10))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_i64().unwrap();
    let run_dir = dir.path().join("runs").join(id.to_string());
    let mut seen = 0;
    for _ in 0..4 {
        // Kill as soon as a new checkpoint file exists: its rows must already be in SQLite.
        let until = deadline();
        let ck = loop {
            match newest_checkpoint(&run_dir) {
                Some(n) if n > seen && n < total => break n,
                _ => {}
            }
            assert!(Instant::now() < until, "no new checkpoint after {seen}");
            std::thread::sleep(Duration::from_millis(1));
        };
        srv.kill();
        seen = ck;
        srv = spawn_bin_server(dir.path(), &["--max-attempts", "100"]);
    }
    let until = deadline();
    let job: Value = loop {
        let j = srv.get(&c, &format!("/api/jobs/{id}")).await;
        if j["status"] == "succeeded" {
            break j;
        }
        assert!(j["status"] != "failed", "{j}");
        assert!(Instant::now() < until, "never finished: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["attempts"], 5, "{job}");
    let m = srv
        .get(&c, &format!("/api/jobs/{id}/metrics?limit=100000"))
        .await;
    assert_eq!(
        metric_steps(&m),
        (1..=total as i64).collect::<Vec<_>>(),
        "no missing or duplicated step rows"
    );
    srv.kill();
}
