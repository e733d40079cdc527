//! The training server over real HTTP on a temporary SQLite file, with a fake trainer that
//! honours the trainer's contract (see `common`). The same flows against the real trainer are
//! in `server_e2e.rs`.

mod common;

use ampserve::store::Store;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashSet;

fn steps(points: &[Value]) -> Vec<i64> {
    points.iter().map(|p| p["step"].as_i64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_runs_to_success_with_metrics_sse_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::held_after(0);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;

    let mut spec = fake_job("lifecycle");
    spec["checkpoint"]["every_steps"] = json!(10);
    let id = srv.submit(&spec).await;
    let job = srv.job(id).await;
    assert_eq!(job["name"], "lifecycle");
    // Preset merged with overrides; the corpus path was resolved to a canonical path.
    assert_eq!(job["spec"]["model"]["d_model"], 128);
    assert_eq!(job["spec"]["train"]["max_steps"], 60);
    let train = job["spec"]["data"]["train"].as_str().unwrap();
    assert!(
        train.starts_with('/') && train.ends_with("tatoeba-en-it/train.en-it.tsv"),
        "{train}"
    );

    // Subscribe while the fake holds before step 1, then let it run.
    srv.wait_status(id, "running").await;
    let sse = srv
        .client
        .get(srv.url(&format!("/api/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), StatusCode::OK);
    assert!(sse.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    fake.release();
    let events = read_sse(sse).await; // ends after the terminal status event
    let job = srv.wait_status(id, "succeeded").await;

    // SSE: current status first, every step in order, validations, checkpoints, final status.
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

    // Job view: progress, current and best metrics, loss scale, skipped steps.
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

    // Metrics: every step once, in order, paginated.
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

    // Downsampling keeps each bucket's last point with its loss range, and the final point.
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

    // Validations with samples.
    let (_, v) = srv.get(&format!("/api/jobs/{id}/validations")).await;
    let vals = v["validations"].as_array().unwrap();
    assert_eq!(
        vals.iter()
            .map(|v| v["step"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [20, 40, 60]
    );
    assert_eq!(vals[0]["samples"][0]["hypothesis"], "Ciao 20.");

    // Checkpoints every 10 steps; retention kept the last 2 plus the best (step 20, BLEU 10)
    // and deleted the rows of the removed files; rows match the files on disk.
    let (_, c) = srv.get(&format!("/api/jobs/{id}/checkpoints")).await;
    let cks = c["checkpoints"].as_array().unwrap();
    assert_eq!(
        cks.iter()
            .map(|c| c["step"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [20, 50, 60]
    );
    assert_eq!(cks.iter().filter(|c| c["is_best"] == true).count(), 1);
    assert_eq!(cks[0]["is_best"], true);
    for ck in cks {
        let path = std::path::Path::new(ck["path"].as_str().unwrap());
        assert!(path.starts_with(
            dir.path()
                .canonicalize()
                .unwrap()
                .join("runs")
                .join(id.to_string())
        ));
        assert_eq!(ck["sha256"].as_str().unwrap(), sha256_file(path));
        assert_eq!(ck["size_bytes"], std::fs::metadata(path).unwrap().len());
        assert_eq!(ck["exists"], true);
    }
    let on_disk = std::fs::read_dir(
        dir.path()
            .join("runs")
            .join(id.to_string())
            .join("checkpoints"),
    )
    .unwrap()
    .filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "safetensors")
    .count();
    assert_eq!(on_disk, cks.len());

    // Listing and the status filter.
    let (_, l) = srv.get("/api/jobs?status=succeeded").await;
    assert_eq!(l["total"], 1);
    assert_eq!(l["jobs"][0]["id"], id);
    let (_, l) = srv.get("/api/jobs?status=queued").await;
    assert_eq!(l["total"], 0);

    // An SSE subscription to a finished job gets its status and ends.
    let r = srv
        .client
        .get(srv.url(&format!("/api/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    let ev = read_sse(r).await;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].1["status"], "succeeded");

    // Prometheus text.
    let text = srv
        .client
        .get(srv.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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

    // Delete removes rows and files.
    let (s, _) = srv.delete(&format!("/api/jobs/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(!dir.path().join("runs").join(id.to_string()).exists());
    let (s, e) = srv.get(&format!("/api/jobs/{id}/metrics")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(e["error"]["code"], "not_found");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_keeps_latest_checkpoint_and_resume_continues_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::held_after(25);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    let id = srv.submit(&fake_job("cancel-me")).await;
    srv.wait_job(id, "step 25", |j| j["progress"]["step"] == 25)
        .await;

    let (s, j) = srv
        .post(&format!("/api/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{j}");
    assert!(
        j["status"] == "cancelling" || j["status"] == "cancelled",
        "{j}"
    );
    let job = srv.wait_status(id, "cancelled").await;
    assert_eq!(job["progress"]["step"], 25);
    assert!(job["error"].is_null());
    // Cancelling again is a conflict; so is deleting... no: a cancelled job may be deleted,
    // but not resumed twice.
    let (s, e) = srv
        .post(&format!("/api/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(e["error"]["code"], "conflict");

    let (_, c) = srv.get(&format!("/api/jobs/{id}/checkpoints")).await;
    let cks: Vec<i64> = c["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_i64().unwrap())
        .collect();
    assert_eq!(cks, [20, 25], "the cancel checkpoint is the latest");
    assert_eq!(
        steps(&srv.all_metrics(id).await),
        (1..=25).collect::<Vec<_>>()
    );

    fake.release();
    let (s, j) = srv
        .post(&format!("/api/jobs/{id}/resume"), &json!({}))
        .await;
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

    let (s, e) = srv
        .post(&format!("/api/jobs/{id}/resume"), &json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("succeeded"));

    // A queued job is cancelled at once.
    fake.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    fake.hold_after
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let a = srv.submit(&fake_job("blocker")).await;
    let b = srv.submit(&fake_job("waiting")).await;
    srv.wait_status(a, "running").await;
    let (s, j) = srv.post(&format!("/api/jobs/{b}/cancel"), &json!({})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j["status"], "cancelled");
    fake.release();
    srv.wait_status(a, "succeeded").await;
    assert_eq!(srv.job(b).await["status"], "cancelled");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_and_errors_fail_the_job_and_the_worker_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::new();
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    let p = srv.submit(&fake_job("will-panic")).await;
    let job = srv.wait_status(p, "failed").await;
    let err = job["error"].as_str().unwrap();
    assert!(
        err.contains("panicked") && err.contains("fake trainer exploded at step 3"),
        "{err}"
    );
    let f = srv.submit(&fake_job("will-fail")).await;
    let job = srv.wait_status(f, "failed").await;
    assert_eq!(job["error"], "data: corpus vanished at step 2");
    // The same single worker still runs jobs.
    let ok = srv.submit(&fake_job("fine")).await;
    srv.wait_status(ok, "succeeded").await;
    // A failed job can be resumed (it fails again here, deterministically).
    let (s, _) = srv.post(&format!("/api/jobs/{f}/resume"), &json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let job = srv
        .wait_job(f, "second failure", |j| {
            j["status"] == "failed" && j["attempts"] == 2
        })
        .await;
    assert!(job["error"].as_str().unwrap().contains("vanished"));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_three_jobs_no_job_runs_twice() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeTrainer::held_after(1);
    let mut args = args_for(dir.path());
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
    // Both workers are busy: the third waits, and keeps waiting while they are held.
    for _ in 0..5 {
        assert_eq!(srv.job(ids[2]).await["status"], "queued");
        let (_, l) = srv.get("/api/jobs?status=running").await;
        assert_eq!(l["total"], 2);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let w0 = srv.job(ids[0]).await["worker"].clone();
    let w1 = srv.job(ids[1]).await["worker"].clone();
    assert_ne!(w0, w1);
    let text = srv
        .client
        .get(srv.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
async fn bad_input_gets_json_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.tsv");
    std::fs::write(&secret, "a\tb\n").unwrap();
    let fake = FakeTrainer::held_after(1);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    std::os::unix::fs::symlink(&secret, dir.path().join("corpora").join("link.tsv")).unwrap();

    let expect = |s: StatusCode, v: &Value, status: u16, code: &str, field: Option<&str>| {
        assert_eq!(s.as_u16(), status, "{v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        match field {
            Some(f) => assert_eq!(v["error"]["field"], f, "{v}"),
            None => assert!(v["error"].get("field").is_none(), "{v}"),
        }
    };

    let (s, v) = srv.post_raw("/api/jobs", "{\"name\": \"x\",").await;
    expect(s, &v, 400, "malformed_json", None);
    let (s, v) = srv.post_raw("/api/jobs", "").await;
    expect(s, &v, 400, "malformed_json", None);
    let (s, v) = srv.post("/api/jobs", &json!([1, 2])).await;
    expect(s, &v, 422, "invalid_value", Some("body"));
    let (s, v) = srv
        .post("/api/jobs", &json!({"train": {"batch_sise": 3}}))
        .await;
    expect(s, &v, 422, "invalid_value", Some("train.batch_sise"));
    let (s, v) = srv.post("/api/jobs", &json!({"colour": "blue"})).await;
    expect(s, &v, 422, "invalid_value", Some("colour"));
    let (s, v) = srv
        .post("/api/jobs", &json!({"train": {"lr": "fast"}}))
        .await;
    expect(s, &v, 422, "invalid_value", Some("train.lr"));
    let (s, v) = srv
        .post("/api/jobs", &json!({"train": {"precision": "fp8"}}))
        .await;
    expect(s, &v, 422, "invalid_value", Some("train.precision"));
    let (s, v) = srv
        .post(
            "/api/jobs",
            &json!({"config": "tiny", "model": {"heads": 7}}),
        )
        .await;
    expect(s, &v, 422, "invalid_value", Some("model.heads"));
    let (s, v) = srv
        .post("/api/jobs", &json!({"train": {"batch_size": 0}}))
        .await;
    expect(s, &v, 422, "invalid_value", Some("train.batch_size"));
    let (s, v) = srv.post("/api/jobs", &json!({"train": {"lr": -1.0}})).await;
    expect(s, &v, 422, "invalid_value", Some("train.lr"));
    let (s, v) = srv.post("/api/jobs", &json!({"priority": 5000})).await;
    expect(s, &v, 422, "invalid_value", Some("priority"));
    let (s, v) = srv
        .post("/api/jobs", &json!({"config": "../etc/passwd"}))
        .await;
    expect(s, &v, 422, "invalid_value", Some("config"));
    let (s, v) = srv.post("/api/jobs", &json!({"config": "huge"})).await;
    expect(s, &v, 422, "invalid_value", Some("config"));
    assert!(v["error"]["message"].as_str().unwrap().contains("tiny"));

    // Corpus paths outside the data roots, by absolute path, `..` or symlink.
    for (path, field) in [
        (secret.to_str().unwrap().to_string(), "data.train"),
        (
            "tatoeba-en-it/../../../../../../../../../../etc/passwd".to_string(),
            "data.train",
        ),
        ("/etc/passwd".to_string(), "data.train"),
        (
            dir.path()
                .join("corpora/link.tsv")
                .to_str()
                .unwrap()
                .to_string(),
            "data.train",
        ),
        ("link.tsv".to_string(), "data.train"),
        ("tatoeba-en-it/nope.tsv".to_string(), "data.train"),
    ] {
        let (s, v) = srv
            .post("/api/jobs", &json!({"data": {"train": path}}))
            .await;
        expect(s, &v, 422, "invalid_value", Some(field));
    }
    let (s, v) = srv
        .post(
            "/api/jobs",
            &json!({"config": "tiny", "data": {"valid": "/etc/hostname"}}),
        )
        .await;
    expect(s, &v, 422, "invalid_value", Some("data.valid"));

    // Oversized body.
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(2 << 20));
    let (s, v) = srv.post_raw("/api/jobs", big).await;
    expect(s, &v, 413, "payload_too_large", None);

    // Unknown ids, bad ids, unknown routes, bad query values.
    let (s, v) = srv.get("/api/jobs/999").await;
    expect(s, &v, 404, "not_found", None);
    let (s, v) = srv.post("/api/jobs/999/cancel", &json!({})).await;
    expect(s, &v, 404, "not_found", None);
    let (s, v) = srv.delete("/api/jobs/999").await;
    expect(s, &v, 404, "not_found", None);
    let (s, v) = srv.get("/api/jobs/abc").await;
    expect(s, &v, 400, "bad_request", None);
    let (s, v) = srv.get("/api/nothing-here").await;
    expect(s, &v, 404, "not_found", None);
    let (s, v) = srv.get("/api/jobs?status=sleeping").await;
    expect(s, &v, 422, "invalid_value", Some("status"));
    let (s, v) = srv.get("/api/jobs?limit=lots").await;
    assert_eq!(s.as_u16(), 422, "{v}");
    assert_eq!(v["error"]["code"], "invalid_query");

    // Deleting a running job is refused; its metrics endpoint validates its parameters.
    let id = srv.submit(&fake_job("running")).await;
    srv.wait_status(id, "running").await;
    let (s, v) = srv.delete(&format!("/api/jobs/{id}")).await;
    expect(s, &v, 409, "conflict", None);
    let (s, v) = srv
        .get(&format!("/api/jobs/{id}/metrics?every=2&points=3"))
        .await;
    expect(s, &v, 422, "invalid_value", Some("points"));
    let (s, v) = srv.get(&format!("/api/jobs/{id}/metrics?limit=0")).await;
    expect(s, &v, 422, "invalid_value", Some("limit"));
    let (s, v) = srv
        .post(&format!("/api/jobs/{id}/resume"), &json!({}))
        .await;
    expect(s, &v, 409, "conflict", None);

    // Still serving.
    let (s, _) = srv.get("/healthz").await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = srv.get("/readyz").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["database"], "ok");
    fake.release();
    srv.wait_status(id, "succeeded").await;
    let (s, _) = srv.delete(&format!("/api/jobs/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_guards_mutations_and_optionally_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args_for(dir.path());
    args.api_token = Some("s3cret".into());
    let srv = TestServer::start(args.clone(), FakeTrainer::new()).await;
    let (s, v) = srv.post("/api/jobs", &fake_job("t")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "unauthorized");
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
    let r = srv
        .client
        .post(srv.url("/api/jobs"))
        .bearer_auth("s3cret")
        .json(&fake_job("t"))
        .send()
        .await
        .unwrap();
    let (s, v) = split(r).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_i64().unwrap();
    // Reads stay open.
    srv.wait_status(id, "succeeded").await;
    let (s, _) = srv.delete(&format!("/api/jobs/{id}")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    srv.stop().await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_upload_is_checked_listed_and_trainable() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args_for(dir.path());
    args.max_upload_mb = 1;
    let fake = FakeTrainer::new();
    let srv = TestServer::start(args, fake.clone()).await;
    let train = std::fs::read_to_string("data/tatoeba-en-it/train.en-it.tsv").unwrap();
    let mut body: String = train.lines().take(300).map(|l| format!("{l}\n")).collect();
    body.push_str("this line has no tab\n");
    body.push_str("one\ttwo\tthree\n");
    let upload = |q: &str, body: Vec<u8>| {
        srv.client
            .post(srv.url(&format!("/api/corpora?{q}")))
            .header("content-type", "text/tab-separated-values")
            .body(body)
            .send()
    };
    let (s, v) = split(
        upload(
            "name=mine&src_lang=en&tgt_lang=it",
            body.clone().into_bytes(),
        )
        .await
        .unwrap(),
    )
    .await;
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

    let (s, v) = split(
        upload("name=mine&src_lang=en&tgt_lang=it", b"a\tb\n".to_vec())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = split(
        upload("name=../evil&src_lang=en&tgt_lang=it", b"a\tb\n".to_vec())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s.as_u16(), v["error"]["field"].as_str()),
        (422, Some("name"))
    );
    let (s, v) = split(
        upload(
            "name=empty&src_lang=en&tgt_lang=it",
            b"no tabs\nat all\n".to_vec(),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (s.as_u16(), v["error"]["field"].as_str()),
        (422, Some("body"))
    );
    let big: String = train
        .lines()
        .cycle()
        .take(30_000)
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(big.len() > 1 << 20);
    let (s, v) = split(
        upload("name=big&src_lang=en&tgt_lang=it", big.into_bytes())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("corpora"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("mine.en-it.tsv")]);

    let (_, l) = srv.get("/api/corpora").await;
    assert_eq!(l["corpora"].as_array().unwrap().len(), 1);
    assert_eq!(l["corpora"][0]["name"], "mine");

    // Train on it, naming the file relative to the data root.
    let id = srv
        .submit(&json!({"name": "own-data", "data": {"train": "mine.en-it.tsv"}, "train": {"max_steps": 10}}))
        .await;
    let j = srv.wait_status(id, "succeeded").await;
    assert_eq!(j["spec"]["data"]["train"], path);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_requeues_and_crash_recovery_resumes_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    // 1. Ctrl-C while running: the job checkpoints and goes back to `queued`.
    let fake = FakeTrainer::held_after(45);
    let srv = TestServer::start(args_for(dir.path()), fake.clone()).await;
    let id = srv.submit(&fake_job("survivor")).await;
    srv.wait_job(id, "step 45", |j| j["progress"]["step"] == 45)
        .await;
    srv.stop().await;

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

    // 2. Make it look like a crash at step 45 where the step-45 checkpoint never reached disk
    //    and the step-40 file is corrupt: recovery must resume from step 20.
    sqlx::query("UPDATE jobs SET status = 'running' WHERE id = ?")
        .bind(id)
        .execute(store.pool())
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
    fake2
        .run_counter
        .store(1, std::sync::atomic::Ordering::SeqCst); // its rows say 2000
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
    let (_, c) = srv.get(&format!("/api/jobs/{id}/checkpoints")).await;
    for ck in c["checkpoints"].as_array().unwrap() {
        let p = std::path::Path::new(ck["path"].as_str().unwrap());
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
    let mut bad = args_for(dir.path());
    bad.devices = vec!["tpu:0".into()];
    srv.stop().await;
    let err = ampserve::app::build_app(&bad, FakeTrainer::new())
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("unknown device `tpu:0`"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_runs_first() {
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
