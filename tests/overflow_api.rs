//! The server with the real trainer on the bundled Tatoeba en-it corpus, f16 runs that
//! overflow: what the API says about their skipped and overflowing steps.

mod common;

use ampserve::worker::CandleTrainer;
use common::*;
use serde_json::{json, Value};
use std::sync::Arc;

/// An f16 tiny job whose first steps overflow (2^30 initial scale) and whose scale grows back
/// every 5 clean steps, so skipped steps come back all along the run.
fn overflowing_job(name: &str, max_steps: u64) -> Value {
    let mut j = tiny_real_job(name, max_steps, 0);
    j["train"]["precision"] = json!("f16");
    j["amp"] = json!({"init_scale": 2f64.powi(30), "growth_interval": 5});
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downsampled_points_carry_the_exact_skipped_and_overflowed_counts_of_their_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let id = srv.submit(&overflowing_job("skips", 40)).await;
    let job = srv.wait_status(id, "succeeded").await;
    let all = srv.all_metrics(id).await;
    assert_eq!(all.len(), 40);
    let skipped_total = all.iter().filter(|r| r["skipped"] == true).count();
    assert!(
        skipped_total >= 3,
        "2^30 must overflow f16: {skipped_total}"
    );
    assert_eq!(job["metrics"]["skipped_steps"], skipped_total);
    for q in ["every=10", "points=3"] {
        let (_, ds) = srv.get(&format!("/api/jobs/{id}/metrics?{q}")).await;
        let pts = ds["points"].as_array().unwrap();
        assert!(pts.len() > 1, "{q}: {ds}");
        let mut sum = 0;
        for p in pts {
            let n = p["bucket"].as_u64().unwrap() as usize;
            let end = p["step"].as_u64().unwrap() as usize;
            let rows = &all[end - n..end];
            let count = |f: &str| rows.iter().filter(|r| r[f] == true).count();
            assert_eq!(p["bucket_skipped"], count("skipped"), "{q}: {p}");
            assert_eq!(p["bucket_overflowed"], count("found_inf"), "{q}: {p}");
            sum += p["bucket_skipped"].as_u64().unwrap() as usize;
        }
        assert_eq!(sum, skipped_total, "{q}");
    }
    // plain rows say 0 or 1 for themselves
    let first = &all[0];
    assert_eq!(
        first["bucket_skipped"],
        first["skipped"].as_bool().unwrap() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_inf_names_its_tensor_in_overflows_at_the_scale_of_that_step() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let target = "decoder.layers.0.ffn.linear_2.weight";
    let mut job = tiny_real_job("forensics", 30, 0);
    job["train"]["precision"] = json!("f16");
    job["amp"] = json!({
        "init_scale": 2f64.powi(30),
        "underflow_every": 5,
        "test_inject_inf": {"tensor": target, "from_step": 25, "count": 1}
    });
    let id = srv.submit(&job).await;
    srv.wait_status(id, "succeeded").await;
    let all = srv.all_metrics(id).await;
    let skipped: Vec<i64> = all
        .iter()
        .filter(|r| r["skipped"] == true)
        .map(|r| r["step"].as_i64().unwrap())
        .collect();
    assert!(
        skipped.contains(&25),
        "the injected step is skipped: {skipped:?}"
    );
    assert!(
        skipped.len() >= 3,
        "2^30 overflows f16 at first: {skipped:?}"
    );

    let (s, o) = srv
        .get(&format!("/api/jobs/{id}/overflows?recent=100"))
        .await;
    assert_eq!(s, reqwest::StatusCode::OK, "{o}");
    // every skipped step is an overflow event, and only those
    assert_eq!(o["overflow_steps"], skipped.len());
    let mut event_steps: Vec<i64> = o["recent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_i64().unwrap())
        .collect();
    event_steps.reverse();
    assert_eq!(event_steps, skipped);
    // the injected step names exactly the injected tensor: one inf, the rest finite
    let ev = o["recent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["step"] == 25)
        .unwrap();
    let scale_25 = all[24]["loss_scale"].as_f64().unwrap();
    assert_eq!(ev["loss_scale"].as_f64().unwrap(), scale_25);
    let tensors = ev["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 1, "{ev}");
    assert_eq!(tensors[0]["tensor"], target);
    assert_eq!(tensors[0]["non_finite"], 1);
    assert!(tensors[0]["numel"].as_i64().unwrap() > 1);
    assert!(tensors[0]["max_finite"].as_f64().unwrap() > 0.0);
    // the summary lists it with that scale, under its layer
    let t = o["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tensor"] == target)
        .unwrap_or_else(|| panic!("{target} missing: {o}"));
    assert_eq!(t["layer"], "decoder.layers.0");
    assert!(t["scales"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["loss_scale"].as_f64() == Some(scale_25)));
    assert!(o["layers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["layer"] == "decoder.layers.0"));
    // sampled underflow on clean steps that are multiples of 5
    let under = o["underflow"].as_array().unwrap();
    assert!(!under.is_empty());
    for u in under {
        let step = u["step"].as_i64().unwrap();
        assert_eq!(step % 5, 0);
        assert!(!skipped.contains(&step));
        let (z, f) = (
            u["zero_share"].as_f64().unwrap(),
            u["underflow_share"].as_f64().unwrap(),
        );
        assert!((0.0..=1.0).contains(&z) && (0.0..=1.0).contains(&f) && z + f <= 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflows_of_an_unknown_job_is_404_and_a_bad_recent_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let (s, _) = srv.get("/api/jobs/999/overflows").await;
    assert_eq!(s, reqwest::StatusCode::NOT_FOUND);
    let id = srv.submit(&tiny_real_job("clean", 2, 0)).await;
    srv.wait_status(id, "succeeded").await;
    let (s, body) = srv.get(&format!("/api/jobs/{id}/overflows?recent=0")).await;
    assert_eq!(s, reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "recent");
    let (_, o) = srv.get(&format!("/api/jobs/{id}/overflows")).await;
    assert_eq!(
        o["overflow_steps"], 0,
        "an fp32 run of 2 steps has none: {o}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bf16_recovery_shows_in_the_job_the_metrics_and_the_overflows() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), Arc::new(CandleTrainer)).await;
    let target = "decoder.layers.0.ffn.linear_2.weight";
    let mut job = tiny_real_job("recovers", 20, 4);
    job["train"]["precision"] = json!("f16");
    job["amp"] = json!({
        "init_scale": 4.0, "min_scale": 1.0, "max_consecutive_skips": 3,
        "on_scale_collapse": "bf16",
        "test_inject_inf": {"tensor": target, "from_step": 6, "count": 1000}
    });
    let id = srv.submit(&job).await;
    let job = srv.wait_status(id, "succeeded").await;
    let rec = job["recoveries"]
        .as_array()
        .unwrap_or_else(|| panic!("{job}"));
    assert_eq!(rec.len(), 1, "{job}");
    assert_eq!(rec[0]["action"], "bf16");
    assert_eq!(rec[0]["step"], 10);
    assert_eq!(rec[0]["resumed_from_step"], 4);
    assert_eq!(rec[0]["precision"], "bf16");
    assert!(rec[0]["reason"].as_str().unwrap().contains("min_scale"));
    // the stored steps are the run as it went on: 1..=20 once, bf16 (scale 1) after step 4
    let all = srv.all_metrics(id).await;
    assert_eq!(
        metric_steps(&json!({"points": all})),
        (1..=20).collect::<Vec<_>>()
    );
    assert!(all[4..]
        .iter()
        .all(|r| r["loss_scale"] == 1.0 && r["skipped"] == false));
    assert_eq!(job["metrics"]["skipped_steps"], 0);
    // the overflows that led to the collapse stay on record, naming the tensor
    let (_, o) = srv.get(&format!("/api/jobs/{id}/overflows")).await;
    assert_eq!(o["overflow_steps"], 5, "{o}");
    assert_eq!(o["tensors"][0]["tensor"], target);
    assert_eq!(o["recoveries"].as_array().unwrap().len(), 1);
}
