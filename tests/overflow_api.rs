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
