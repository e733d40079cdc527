//! The training server over real HTTP on a temporary SQLite file, with a fake trainer that
//! honours the trainer's contract (see `common`). One behaviour per test; the same flows against
//! the real trainer are in `server_e2e.rs`.

mod common;

use ampserve::store::Store;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;

fn steps(points: &[Value]) -> Vec<i64> {
    points.iter().map(|p| p["step"].as_i64().unwrap()).collect()
}

/// The fake's 60 steps with a validation every 20 and a checkpoint every 10 (retention keeps
/// the last 2 plus the best).
fn lifecycle_job() -> Value {
    let mut spec = fake_job("lifecycle");
    spec["checkpoint"]["every_steps"] = json!(10);
    spec
}

/// A server on `dir` whose one lifecycle job has run to success: (server, id, final job view).
async fn finished_lifecycle(dir: &Path) -> (TestServer, i64, Value) {
    let srv = TestServer::start(args_for(dir), FakeTrainer::new()).await;
    let id = srv.submit(&lifecycle_job()).await;
    let job = srv.wait_status(id, "succeeded").await;
    (srv, id, job)
}

// ---- one job's life: submit, events, metrics, validations, checkpoints, delete ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_job_merges_its_preset_with_the_overrides_and_resolves_the_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let id = srv.submit(&lifecycle_job()).await;
    let job = srv.job(id).await;
    assert_eq!(job["name"], "lifecycle");
    assert_eq!(job["spec"]["model"]["d_model"], 128);
    assert_eq!(job["spec"]["train"]["max_steps"], 60);
    let train = job["spec"]["data"]["train"].as_str().unwrap();
    assert!(
        train.starts_with('/') && train.ends_with("tatoeba-en-it/train.en-it.tsv"),
        "{train}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_sends_the_status_every_step_validations_checkpoints_and_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::held_after(0);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    let id = srv.submit(&lifecycle_job()).await;

    // Subscribe while the fake holds before step 1, then let it run.
    srv.wait_status(id, "running").await;
    let sse = srv.events(id).await;
    assert_eq!(sse.status(), StatusCode::OK);
    assert!(sse.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    fake.release();
    let events = read_sse(sse).await; // ends after the terminal status event
    srv.wait_status(id, "succeeded").await;

    assert_eq!(events[0].0, "status");
    assert_eq!(events[0].1["status"], "running");
    let last = events.last().unwrap();
    assert_eq!(
        (last.0.as_str(), &last.1["status"]),
        ("status", &json!("succeeded"))
    );
    let sse_steps: Vec<i64> = events
        .iter()
        .filter(|e| e.0 == "step")
        .map(|e| e.1["step"].as_i64().unwrap())
        .collect();
    assert_eq!(sse_steps, (1..=60).collect::<Vec<_>>());
    assert!(events
        .iter()
        .all(|e| e.0 == "status" || e.1["job_id"] == id));
    assert_eq!(events.iter().filter(|e| e.0 == "validation").count(), 3);
    assert_eq!(events.iter().filter(|e| e.0 == "checkpoint").count(), 6);
    // `started` precedes the hold, so it may come before the subscription.
    assert!(events.iter().filter(|e| e.0 == "started").count() <= 1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_for_a_finished_job_sends_its_status_and_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, id, _) = finished_lifecycle(dir.path()).await;
    let ev = read_sse(srv.events(id).await).await;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].1["status"], "succeeded");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_shows_progress_best_bleu_loss_scale_and_skipped_steps() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _, job) = finished_lifecycle(dir.path()).await;
    assert_eq!(job["progress"]["step"], 60);
    assert_eq!(job["progress"]["total_steps"], 60);
    assert_eq!(job["progress"]["fraction"], 1.0);
    assert_eq!(job["metrics"]["skipped_steps"], 3); // steps 17, 34, 51
    assert_eq!(job["metrics"]["loss_scale"], 65536.0 / 8.0);
    assert_eq!(job["metrics"]["best_bleu"], 10.0); // BLEU 10, 5, 0 at steps 20, 40, 60
    assert_eq!(job["metrics"]["best_bleu_step"], 20);
    assert_eq!(job["metrics"]["bleu"], 0.0);
    assert!(job["metrics"]["steps_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(job["attempts"], 1);
    assert!(job["finished_at"].is_string());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_hold_every_step_once_in_order_and_page_after_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, id, _) = finished_lifecycle(dir.path()).await;
    let all = srv.all_metrics(id).await;
    assert_eq!(steps(&all), (1..=60).collect::<Vec<_>>());
    assert!(all[16]["skipped"].as_bool().unwrap() && all[16]["grad_norm"].is_null());
    let (_, page) = srv
        .get(&format!("/api/jobs/{id}/metrics?after_step=10&limit=5"))
        .await;
    assert_eq!(
        steps(page["points"].as_array().unwrap()),
        [11, 12, 13, 14, 15]
    );
    assert_eq!(page["next_after_step"], 15);
    let (_, page) = srv
        .get(&format!("/api/jobs/{id}/metrics?after_step=60"))
        .await;
    assert!(page["points"].as_array().unwrap().is_empty());
    assert!(page["next_after_step"].is_null());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downsampled_metrics_keep_each_buckets_last_point_its_loss_range_and_the_final_point() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, id, _) = finished_lifecycle(dir.path()).await;
    let all = srv.all_metrics(id).await;
    let (_, ds) = srv.get(&format!("/api/jobs/{id}/metrics?every=25")).await;
    let pts = ds["points"].as_array().unwrap();
    assert_eq!(steps(pts), [25, 50, 60]);
    let (_, ds) = srv.get(&format!("/api/jobs/{id}/metrics?points=7")).await;
    let pts = ds["points"].as_array().unwrap();
    assert!(pts.len() <= 7);
    assert_eq!(pts.last().unwrap()["step"], 60);
    let mut covered = 0;
    for p in pts {
        let n = p["bucket"].as_i64().unwrap() as usize;
        let end = p["step"].as_i64().unwrap() as usize;
        let bucket = &all[end - n..end];
        let losses: Vec<f64> = bucket.iter().map(|r| r["loss"].as_f64().unwrap()).collect();
        let min = losses.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = losses.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(p["loss_min"].as_f64().unwrap(), min);
        assert_eq!(p["loss_max"].as_f64().unwrap(), max);
        covered += n;
    }
    assert_eq!(covered, 60);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validations_are_listed_by_step_with_their_sample_translations() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, id, _) = finished_lifecycle(dir.path()).await;
    let (_, v) = srv.get(&format!("/api/jobs/{id}/validations")).await;
    let vals = v["validations"].as_array().unwrap();
    assert_eq!(
        vals.iter()
            .map(|v| v["step"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [20, 40, 60]
    );
    assert_eq!(vals[0]["samples"][0]["hypothesis"], "Ciao 20.");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_last_two_checkpoints_plus_the_best_and_the_rows_match_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, id, _) = finished_lifecycle(dir.path()).await;
    // Checkpoints every 10 steps; retention kept the last 2 plus the best (step 20, BLEU 10)
    // and deleted the rows of the removed files.
    let cks = srv.checkpoints(id).await;
    assert_eq!(srv.checkpoint_steps(id).await, [20, 50, 60]);
    assert_eq!(cks.iter().filter(|c| c["is_best"] == true).count(), 1);
    assert_eq!(cks[0]["is_best"], true);
    let run_dir = dir.path().join("runs").join(id.to_string());
    for ck in &cks {
        let path = Path::new(ck["path"].as_str().unwrap());
        assert!(path.starts_with(run_dir.canonicalize().unwrap()));
        assert_eq!(ck["sha256"].as_str().unwrap(), sha256_file(path));
        assert_eq!(ck["size_bytes"], std::fs::metadata(path).unwrap().len());
        assert_eq!(ck["exists"], true);
    }
    let on_disk = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "safetensors")
        .count();
    assert_eq!(on_disk, cks.len());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_list_filters_by_status() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, id, _) = finished_lifecycle(dir.path()).await;
    let (_, l) = srv.get("/api/jobs?status=succeeded").await;
    assert_eq!(l["total"], 1);
    assert_eq!(l["jobs"][0]["id"], id);
    let (_, l) = srv.get("/api/jobs?status=queued").await;
    assert_eq!(l["total"], 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_counts_jobs_by_status_metric_rows_and_http_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _, _) = finished_lifecycle(dir.path()).await;
    let text = srv.prometheus().await;
    assert!(
        text.contains("ampserve_jobs{status=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("ampserve_metric_rows_written_total 60"),
        "{text}"
    );
    assert!(
        text.contains(
            "ampserve_http_requests_total{method=\"POST\",route=\"/api/jobs\",status=\"201\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains(
        "ampserve_http_request_duration_seconds_count{method=\"GET\",route=\"/api/jobs/{id}\"}"
    ));
    let w = srv.app.pool.write_stats();
    eprintln!(
        "metric writes: {} rows in {} flushes, {:.2} ms total, {:.1} us/row",
        w.rows,
        w.flushes,
        w.seconds * 1e3,
        w.seconds * 1e6 / w.rows as f64
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_job_removes_its_rows_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, id, _) = finished_lifecycle(dir.path()).await;
    let (s, _) = srv.delete(&format!("/api/jobs/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(!dir.path().join("runs").join(id.to_string()).exists());
    let (s, e) = srv.get(&format!("/api/jobs/{id}/metrics")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(e["error"]["code"], "not_found");
    srv.stop().await;
}

// ---- cancel and resume ----

/// Cancels a job the fake holds at step 25 and waits until it is cancelled.
async fn cancelled_at_step_25(srv: &TestServer) -> (i64, StatusCode, Value, Value) {
    let id = srv.submit(&fake_job("cancel-me")).await;
    srv.wait_job(id, "step 25", |j| j["progress"]["step"] == 25)
        .await;
    let (s, j) = srv.cancel(id).await;
    let job = srv.wait_status(id, "cancelled").await;
    (id, s, j, job)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_stops_it_at_the_current_step_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::held_after(25)).await;
    let (id, s, j, job) = cancelled_at_step_25(&srv).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{j}");
    assert!(
        j["status"] == "cancelling" || j["status"] == "cancelled",
        "{j}"
    );
    assert_eq!(job["progress"]["step"], 25);
    assert!(job["error"].is_null());
    assert_eq!(
        srv.checkpoint_steps(id).await,
        [20, 25],
        "the cancel checkpoint is the latest"
    );
    assert_eq!(
        steps(&srv.all_metrics(id).await),
        (1..=25).collect::<Vec<_>>()
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_cancelled_job_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::held_after(25)).await;
    let (id, ..) = cancelled_at_step_25(&srv).await;
    let (s, e) = srv.cancel(id).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(e["error"]["code"], "conflict");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_a_cancelled_job_continues_from_its_latest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::held_after(25);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    let (id, ..) = cancelled_at_step_25(&srv).await;
    fake.release();
    let (s, j) = srv.resume(id).await;
    assert_eq!(s, StatusCode::OK, "{j}");
    let job = srv.wait_status(id, "succeeded").await;
    assert_eq!(job["progress"]["resumed_from_step"], 25);
    assert_eq!(job["attempts"], 2);
    let m = srv.all_metrics(id).await;
    assert_eq!(steps(&m), (1..=60).collect::<Vec<_>>());
    // Rows 1..=25 come from the first run, 26..=60 from the resumed one.
    assert!(m[..25].iter().all(|p| p["tokens_per_s"] == 1000.0));
    assert!(m[25..].iter().all(|p| p["tokens_per_s"] == 2000.0));
    assert_eq!(fake.runs().iter().map(|r| r.1).collect::<Vec<_>>(), [0, 25]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_a_succeeded_job_is_a_conflict_that_names_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, id, _) = finished_lifecycle(dir.path()).await;
    let (s, e) = srv.resume(id).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("succeeded"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_is_cancelled_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::held_after(1);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    let a = srv.submit(&fake_job("blocker")).await;
    let b = srv.submit(&fake_job("waiting")).await;
    srv.wait_status(a, "running").await;
    let (s, j) = srv.cancel(b).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j["status"], "cancelled");
    fake.release();
    srv.wait_status(a, "succeeded").await;
    assert_eq!(srv.job(b).await["status"], "cancelled");
    srv.stop().await;
}

// ---- failures ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_trainer_fails_its_job_with_the_panic_message() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let p = srv.submit(&fake_job("will-panic")).await;
    let job = srv.wait_status(p, "failed").await;
    let err = job["error"].as_str().unwrap();
    assert!(
        err.contains("panicked") && err.contains("fake trainer exploded at step 3"),
        "{err}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_error_fails_its_job_with_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let f = srv.submit(&fake_job("will-fail")).await;
    let job = srv.wait_status(f, "failed").await;
    assert_eq!(
        job["error"],
        "data: cannot read corpus.tsv: vanished at step 2"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_panic_and_an_error_the_same_worker_still_runs_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let p = srv.submit(&fake_job("will-panic")).await;
    srv.wait_status(p, "failed").await;
    let f = srv.submit(&fake_job("will-fail")).await;
    srv.wait_status(f, "failed").await;
    let ok = srv.submit(&fake_job("fine")).await;
    srv.wait_status(ok, "succeeded").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_can_be_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let f = srv.submit(&fake_job("will-fail")).await;
    srv.wait_status(f, "failed").await;
    // It fails again here, deterministically.
    let (s, _) = srv.resume(f).await;
    assert_eq!(s, StatusCode::OK);
    let job = srv
        .wait_job(f, "second failure", |j| {
            j["status"] == "failed" && j["attempts"] == 2
        })
        .await;
    assert!(job["error"].as_str().unwrap().contains("vanished"));
    srv.stop().await;
}

// ---- several workers, priorities ----

/// Two workers, three jobs: returns once the first two are held at step 1.
async fn two_workers_busy(dir: &Path) -> (TestServer, std::sync::Arc<FakeTrainer>, [i64; 3]) {
    let fake = FakeTrainer::held_after(1);
    let mut args = args_for(dir);
    args.devices = vec!["cpu,cpu".into()];
    let srv = TestServer::start(args, fake.clone()).await;
    let ids = [
        srv.submit(&fake_job("one")).await,
        srv.submit(&fake_job("two")).await,
        srv.submit(&fake_job("three")).await,
    ];
    for id in &ids[..2] {
        srv.wait_job(*id, "held at step 1", |j| {
            j["status"] == "running" && j["progress"]["step"] == 1
        })
        .await;
    }
    (srv, fake, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_both_workers_busy_a_third_job_waits_in_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, fake, ids) = two_workers_busy(dir.path()).await;
    for _ in 0..5 {
        assert_eq!(srv.job(ids[2]).await["status"], "queued");
        let (_, l) = srv.get("/api/jobs?status=running").await;
        assert_eq!(l["total"], 2);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let w0 = srv.job(ids[0]).await["worker"].clone();
    let w1 = srv.job(ids[1]).await["worker"].clone();
    assert_ne!(w0, w1);
    fake.release();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_shows_running_jobs_workers_and_per_job_gauges() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, fake, ids) = two_workers_busy(dir.path()).await;
    let text = srv.prometheus().await;
    assert!(
        text.contains("ampserve_jobs{status=\"running\"} 2"),
        "{text}"
    );
    assert!(text.contains("ampserve_workers 2"));
    assert!(
        text.contains(&format!(
            "ampserve_job_steps_per_second{{job=\"{}\"",
            ids[0]
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("ampserve_job_loss_scale{{job=\"{}\"", ids[1])),
        "{text}"
    );
    fake.release();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_jobs_on_two_workers_each_run_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, fake, ids) = two_workers_busy(dir.path()).await;
    fake.release();
    for id in ids {
        let j = srv.wait_status(id, "succeeded").await;
        assert_eq!(j["attempts"], 1);
        assert_eq!(
            steps(&srv.all_metrics(id).await),
            (1..=60).collect::<Vec<_>>()
        );
    }
    let runs = fake.runs();
    assert_eq!(runs.len(), 3);
    let names: HashSet<_> = runs.iter().map(|r| r.0.clone()).collect();
    assert_eq!(names.len(), 3, "{runs:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_job_runs_first() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::held_after(1);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    let a = srv.submit(&fake_job("first")).await;
    srv.wait_status(a, "running").await;
    let mut low = fake_job("low");
    low["priority"] = json!(0);
    let mut high = fake_job("high");
    high["priority"] = json!(5);
    let b = srv.submit(&low).await;
    let c = srv.submit(&high).await;
    assert_eq!(srv.job(c).await["priority"], 5);
    fake.release();
    srv.wait_status(b, "succeeded").await;
    srv.wait_status(c, "succeeded").await;
    let order: Vec<String> = fake.runs().into_iter().map(|r| r.0).collect();
    assert_eq!(order, ["first", "high", "low"]);
    srv.stop().await;
}

// ---- bad input ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_or_empty_json_body_gets_400() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let (s, v) = srv.post_raw("/api/jobs", "{\"name\": \"x\",").await;
    assert_api_error(s, &v, 400, "malformed_json", None);
    let (s, v) = srv.post_raw("/api/jobs", "").await;
    assert_api_error(s, &v, 400, "malformed_json", None);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_job_field_gets_422_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    for (body, field) in [
        (json!([1, 2]), "body"),
        (json!({"train": {"batch_sise": 3}}), "train.batch_sise"),
        (json!({"colour": "blue"}), "colour"),
        (json!({"train": {"lr": "fast"}}), "train.lr"),
        (json!({"train": {"precision": "fp8"}}), "train.precision"),
        (
            json!({"config": "tiny", "model": {"heads": 7}}),
            "model.heads",
        ),
        (json!({"train": {"batch_size": 0}}), "train.batch_size"),
        (json!({"train": {"lr": -1.0}}), "train.lr"),
        (json!({"priority": 5000}), "priority"),
        (json!({"config": "../etc/passwd"}), "config"),
    ] {
        let (s, v) = srv.post("/api/jobs", &body).await;
        assert_api_error(s, &v, 422, "invalid_value", Some(field));
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_preset_gets_422_listing_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let (s, v) = srv.post("/api/jobs", &json!({"config": "huge"})).await;
    assert_api_error(s, &v, 422, "invalid_value", Some("config"));
    assert!(v["error"]["message"].as_str().unwrap().contains("tiny"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_path_outside_the_data_roots_gets_422_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.tsv");
    std::fs::write(&secret, "a\tb\n").unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    std::os::unix::fs::symlink(&secret, dir.path().join("corpora").join("link.tsv")).unwrap();
    // By absolute path, `..` or symlink.
    for path in [
        secret.to_str().unwrap().to_string(),
        "tatoeba-en-it/../../../../../../../../../../etc/passwd".to_string(),
        "/etc/passwd".to_string(),
        dir.path()
            .join("corpora/link.tsv")
            .to_str()
            .unwrap()
            .to_string(),
        "link.tsv".to_string(),
        "tatoeba-en-it/nope.tsv".to_string(),
    ] {
        let (s, v) = srv
            .post("/api/jobs", &json!({"data": {"train": path}}))
            .await;
        assert_api_error(s, &v, 422, "invalid_value", Some("data.train"));
    }
    let (s, v) = srv
        .post(
            "/api/jobs",
            &json!({"config": "tiny", "data": {"valid": "/etc/hostname"}}),
        )
        .await;
    assert_api_error(s, &v, 422, "invalid_value", Some("data.valid"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_413() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(2 << 20));
    let (s, v) = srv.post_raw("/api/jobs", big).await;
    assert_api_error(s, &v, 413, "payload_too_large", None);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_bad_ids_unknown_routes_and_bad_query_values_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let (s, v) = srv.get("/api/jobs/999").await;
    assert_api_error(s, &v, 404, "not_found", None);
    let (s, v) = srv.cancel(999).await;
    assert_api_error(s, &v, 404, "not_found", None);
    let (s, v) = srv.delete("/api/jobs/999").await;
    assert_api_error(s, &v, 404, "not_found", None);
    let (s, v) = srv.get("/api/jobs/abc").await;
    assert_api_error(s, &v, 400, "bad_request", None);
    let (s, v) = srv.get("/api/nothing-here").await;
    assert_api_error(s, &v, 404, "not_found", None);
    let (s, v) = srv.get("/api/jobs?status=sleeping").await;
    assert_api_error(s, &v, 422, "invalid_value", Some("status"));
    let (s, v) = srv.get("/api/jobs?limit=lots").await;
    assert_eq!(s.as_u16(), 422, "{v}");
    assert_eq!(v["error"]["code"], "invalid_query");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_cannot_be_deleted_or_resumed_and_its_metrics_query_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::held_after(1);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    let id = srv.submit(&fake_job("running")).await;
    srv.wait_status(id, "running").await;
    let (s, v) = srv.delete(&format!("/api/jobs/{id}")).await;
    assert_api_error(s, &v, 409, "conflict", None);
    let (s, v) = srv
        .get(&format!("/api/jobs/{id}/metrics?every=2&points=3"))
        .await;
    assert_api_error(s, &v, 422, "invalid_value", Some("points"));
    let (s, v) = srv.get(&format!("/api/jobs/{id}/metrics?limit=0")).await;
    assert_api_error(s, &v, 422, "invalid_value", Some("limit"));
    let (s, v) = srv.resume(id).await;
    assert_api_error(s, &v, 409, "conflict", None);
    // Once it has finished, it may be deleted.
    fake.release();
    srv.wait_status(id, "succeeded").await;
    let (s, _) = srv.delete(&format!("/api/jobs/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_bad_input_the_server_is_still_healthy_and_ready() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    srv.post_raw("/api/jobs", "{\"name\": \"x\",").await;
    srv.post_raw(
        "/api/jobs",
        format!("{{\"name\": \"{}\"}}", "x".repeat(2 << 20)),
    )
    .await;
    srv.post("/api/jobs", &json!({"train": {"lr": "fast"}}))
        .await;
    let (s, _) = srv.get("/healthz").await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = srv.get("/readyz").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["database"], "ok");
    srv.stop().await;
}

// ---- the bearer token ----

fn token_args(dir: &Path) -> ampserve::app::ServeArgs {
    let mut args = args_for(dir);
    args.api_token = Some("s3cret".into());
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_a_mutation_without_it_gets_401() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(token_args(dir.path()), FakeTrainer::new()).await;
    let (s, v) = srv.post("/api/jobs", &fake_job("t")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "unauthorized");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_gets_401_with_a_bearer_challenge() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(token_args(dir.path()), FakeTrainer::new()).await;
    let r = srv
        .client
        .post(srv.url("/api/jobs"))
        .bearer_auth("wrong")
        .json(&fake_job("t"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let (s, v) = split(r).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["error"]["message"].as_str().unwrap().contains("invalid"));
    srv.stop().await;
}

/// Submits a job with the right token and waits (reading without it) until it succeeds.
async fn submit_with_token(srv: &TestServer) -> (StatusCode, Value, i64) {
    let r = srv
        .client
        .post(srv.url("/api/jobs"))
        .bearer_auth("s3cret")
        .json(&fake_job("t"))
        .send()
        .await
        .unwrap();
    let (s, v) = split(r).await;
    let id = v["id"].as_i64().unwrap_or_else(|| panic!("{s}: {v}"));
    srv.wait_status(id, "succeeded").await;
    (s, v, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_token_may_submit_while_reads_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(token_args(dir.path()), FakeTrainer::new()).await;
    let (s, v, id) = submit_with_token(&srv).await; // waited on without the token
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, _) = srv.delete(&format!("/api/jobs/{id}")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_reads_need_the_token_but_health_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(token_args(dir.path()), FakeTrainer::new()).await;
    let (_, _, id) = submit_with_token(&srv).await;
    srv.stop().await;

    let mut args = token_args(dir.path());
    args.protect_reads = true;
    let srv = TestServer::start(args, FakeTrainer::new()).await;
    let (s, v) = srv.get(&format!("/api/jobs/{id}")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let r = srv
        .client
        .get(srv.url(&format!("/api/jobs/{id}")))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    let (s, v) = split(r).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "succeeded");
    let (s, _) = srv.get("/healthz").await;
    assert_eq!(s, StatusCode::OK);
    srv.stop().await;
}

// ---- corpus upload ----

const UPLOAD: &str = "name=mine&src_lang=en&tgt_lang=it";

/// 300 lines of the bundled corpus, then one line without a tab and one with two.
fn upload_body() -> String {
    let train = std::fs::read_to_string("data/tatoeba-en-it/train.en-it.tsv").unwrap();
    let mut body: String = train.lines().take(300).map(|l| format!("{l}\n")).collect();
    body.push_str("this line has no tab\n");
    body.push_str("one\ttwo\tthree\n");
    body
}

/// A server with a 1 MB upload limit.
async fn upload_server(dir: &Path) -> TestServer {
    let mut args = args_for(dir);
    args.max_upload_mb = 1;
    TestServer::start(args, FakeTrainer::new()).await
}

/// Over 1 MB of corpus lines.
fn big_corpus() -> String {
    let train = std::fs::read_to_string("data/tatoeba-en-it/train.en-it.tsv").unwrap();
    let big: String = train
        .lines()
        .cycle()
        .take(30_000)
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(big.len() > 1 << 20);
    big
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_corpus_is_stored_as_sent_with_its_malformed_lines_counted() {
    let dir = tempfile::tempdir().unwrap();
    let srv = upload_server(dir.path()).await;
    let body = upload_body();
    let (s, v) = srv.upload_corpus(UPLOAD, body.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["corpus"]["lines"], 300);
    assert_eq!(v["corpus"]["malformed_lines"], 2);
    assert_eq!(
        v["malformed_examples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["line"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [301, 302]
    );
    let path = v["corpus"]["path"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), body);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploading_a_corpus_under_a_taken_name_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let srv = upload_server(dir.path()).await;
    srv.upload_corpus(UPLOAD, upload_body()).await;
    let (s, v) = srv.upload_corpus(UPLOAD, "a\tb\n").await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_name_with_a_path_gets_422_naming_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let srv = upload_server(dir.path()).await;
    let (s, v) = srv
        .upload_corpus("name=../evil&src_lang=en&tgt_lang=it", "a\tb\n")
        .await;
    assert_eq!(
        (s.as_u16(), v["error"]["field"].as_str()),
        (422, Some("name"))
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_without_tab_separated_pairs_gets_422_naming_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let srv = upload_server(dir.path()).await;
    let (s, v) = srv
        .upload_corpus("name=empty&src_lang=en&tgt_lang=it", "no tabs\nat all\n")
        .await;
    assert_eq!(
        (s.as_u16(), v["error"]["field"].as_str()),
        (422, Some("body"))
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_over_the_upload_limit_gets_413() {
    let dir = tempfile::tempdir().unwrap();
    let srv = upload_server(dir.path()).await;
    let (s, v) = srv
        .upload_corpus("name=big&src_lang=en&tgt_lang=it", big_corpus())
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_uploads_leave_no_file_and_only_the_stored_corpus_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let srv = upload_server(dir.path()).await;
    srv.upload_corpus(UPLOAD, upload_body()).await;
    for (query, body) in [
        (UPLOAD, "a\tb\n".to_string()),
        ("name=../evil&src_lang=en&tgt_lang=it", "a\tb\n".into()),
        (
            "name=empty&src_lang=en&tgt_lang=it",
            "no tabs\nat all\n".into(),
        ),
        ("name=big&src_lang=en&tgt_lang=it", big_corpus()),
    ] {
        let (s, v) = srv.upload_corpus(query, body).await;
        assert!(s.is_client_error(), "{query}: {s} {v}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("corpora"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("mine.en-it.tsv")]);
    let (_, l) = srv.get("/api/corpora").await;
    assert_eq!(l["corpora"].as_array().unwrap().len(), 1);
    assert_eq!(l["corpora"][0]["name"], "mine");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_on_an_uploaded_corpus_named_relative_to_the_data_root() {
    let dir = tempfile::tempdir().unwrap();
    let srv = upload_server(dir.path()).await;
    let (_, v) = srv.upload_corpus(UPLOAD, upload_body()).await;
    let path = v["corpus"]["path"].as_str().unwrap().to_string();
    let id = srv
        .submit(&json!({"name": "own-data", "data": {"train": "mine.en-it.tsv"}, "train": {"max_steps": 10}}))
        .await;
    let j = srv.wait_status(id, "succeeded").await;
    assert_eq!(j["spec"]["data"]["train"], path);
    srv.stop().await;
}

// ---- shutdown, crash recovery, start-up checks ----

/// Runs a job to step 45 and shuts the server down gracefully (what Ctrl-C does).
async fn shut_down_at_step_45(dir: &Path) -> (std::sync::Arc<FakeTrainer>, i64) {
    let fake = FakeTrainer::held_after(45);
    let srv = TestServer::start(args_for(dir), fake.clone()).await;
    let id = srv.submit(&fake_job("survivor")).await;
    srv.wait_job(id, "step 45", |j| j["progress"]["step"] == 45)
        .await;
    srv.stop().await;
    (fake, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_checkpoints_a_running_job_and_requeues_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_, id) = shut_down_at_step_45(dir.path()).await;
    let store = Store::open(&dir.path().join("ampserve.db")).await.unwrap();
    let job = store.get_job(id).await.unwrap().unwrap();
    assert_eq!(job.status, "queued");
    let cks: Vec<i64> = store
        .list_checkpoints(id)
        .await
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(cks, [20, 40, 45]);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_a_job_resumes_from_its_latest_valid_checkpoint_without_duplicate_steps() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, id) = shut_down_at_step_45(dir.path()).await;
    // Make it look like a crash at step 45 where the step-45 checkpoint never reached disk and
    // the step-40 file is corrupt: recovery must resume from step 20.
    let store = Store::open(&dir.path().join("ampserve.db")).await.unwrap();
    store
        .execute(&format!(
            "UPDATE jobs SET status = 'running' WHERE id = {id}"
        ))
        .await
        .unwrap();
    let ck_dir = dir
        .path()
        .join("runs")
        .join(id.to_string())
        .join("checkpoints");
    std::fs::remove_file(ck_dir.join("ckpt-00000045.safetensors")).unwrap();
    std::fs::write(ck_dir.join("ckpt-00000040.safetensors"), b"garbage").unwrap();
    store.close().await;

    let fake2 = FakeTrainer::new();
    fake2.run_counter.store(1, Ordering::SeqCst); // its rows say 2000
    let srv = TestServer::start(args_for(dir.path()), fake2.clone()).await;
    let job = srv.wait_status(id, "succeeded").await;
    assert_eq!(job["attempts"], 2);
    assert_eq!(job["progress"]["resumed_from_step"], 20);
    assert_eq!(fake.runs().iter().map(|r| r.1).collect::<Vec<_>>(), [0]);
    assert_eq!(
        fake2.runs().iter().map(|r| (r.1, r.2)).collect::<Vec<_>>(),
        [(20, 2)]
    );
    let m = srv.all_metrics(id).await;
    assert_eq!(
        steps(&m),
        (1..=60).collect::<Vec<_>>(),
        "no duplicated or missing steps"
    );
    // Steps after the checkpoint (21..=45 existed already) were replaced by the resumed run.
    assert!(m[..20].iter().all(|p| p["tokens_per_s"] == 1000.0));
    assert!(m[20..].iter().all(|p| p["tokens_per_s"] == 2000.0));
    for ck in srv.checkpoints(id).await {
        let p = Path::new(ck["path"].as_str().unwrap());
        assert_eq!(ck["sha256"].as_str().unwrap(), sha256_file(p), "{ck}");
    }
    assert_eq!(job["metrics"]["skipped_steps"], 3);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::new()).await;
    let err = ampserve::app::build_app(&args_for(dir.path()), FakeTrainer::new())
        .await
        .err()
        .expect("second server must not start");
    assert!(err.to_string().contains("another ampserve"), "{err:#}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_an_unknown_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad = args_for(dir.path());
    bad.devices = vec!["tpu:0".into()];
    let err = ampserve::app::build_app(&bad, FakeTrainer::new())
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("unknown device `tpu:0`"),
        "{err:#}"
    );
}
