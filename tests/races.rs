//! Issue 13, races and streams: a cancel answered 202 never ends `succeeded`, and each SSE
//! subscriber receives only its own job's events.

mod common;

use ampserve::config::TrainSpec;
use ampserve::train::{RunOptions, StartInfo, StepRecord, Summary, TrainError, TrainEvent};
use ampserve::worker::Trainer;
use common::*;
use reqwest::StatusCode;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A trainer that has already taken its last step when the cancel comes: it waits for `go`,
/// then returns a complete (not cancelled) summary, as a real run does when the cancel lands
/// between its last step and its return.
struct FinishesAnyway {
    go: AtomicBool,
}

impl Trainer for FinishesAnyway {
    fn run(
        &self,
        _spec: &TrainSpec,
        opts: &RunOptions,
        sink: &mut dyn FnMut(TrainEvent),
        _cancel: &AtomicBool,
    ) -> Result<Summary, TrainError> {
        sink(TrainEvent::Started(StartInfo {
            run_dir: opts.out_dir.clone(),
            steps_per_epoch: 1,
            total_steps: 1,
            resumed_from_step: 0,
            src_vocab: 10,
            tgt_vocab: 10,
            train_pairs: 1,
            valid_pairs: 0,
            dropped_long: 0,
            truncated_long: 0,
            malformed_lines: 0,
            parameters: 1,
            device: "cpu".into(),
        }));
        sink(TrainEvent::Step(StepRecord {
            step: 1,
            epoch: 0,
            loss: 1.0,
            lr: 1e-3,
            loss_scale: 1.0,
            found_inf: false,
            skipped: false,
            grad_norm: 1.0,
            tokens_per_s: 1.0,
            step_ms: 1.0,
        }));
        while !self.go.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Summary {
            run_dir: opts.out_dir.clone(),
            steps: 1,
            epochs_completed: 1,
            skipped_steps: 0,
            final_loss: 1.0,
            final_loss_scale: 1.0,
            best_bleu: None,
            best_checkpoint: None,
            latest_checkpoint: None,
            wall_s: 0.0,
            tokens_per_s: 1.0,
            cancelled: false,
            stopped_by: None,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_answered_202_ends_cancelled_even_when_the_run_finishes_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let trainer = Arc::new(FinishesAnyway {
        go: AtomicBool::new(false),
    });
    let srv = TestServer::start(args_for(dir.path()), trainer.clone()).await;
    let id = srv.submit(&fake_job("race")).await;
    srv.wait_job(id, "its step", |j| j["progress"]["step"] == 1)
        .await;
    let (s, v) = srv
        .post(&format!("/api/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["status"], "cancelling");
    trainer.go.store(true, Ordering::SeqCst);
    let j = srv
        .wait_job(id, "an end", |j| {
            !matches!(j["status"].as_str(), Some("running" | "cancelling"))
        })
        .await;
    assert_eq!(j["status"], "cancelled", "{j}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sse_subscriber_receives_only_its_own_jobs_events() {
    let dir = tempfile::tempdir().unwrap();
    let args = ampserve::app::ServeArgs {
        devices: vec!["cpu".into(), "cpu".into()],
        ..args_for(dir.path())
    };
    let srv = TestServer::start(args, FakeTrainer::new()).await;
    let a = srv.submit(&fake_job("sse-a")).await;
    let b = srv.submit(&fake_job("sse-b")).await;
    let open = |id: i64| {
        let (c, url) = (
            srv.client.clone(),
            srv.url(&format!("/api/jobs/{id}/events")),
        );
        tokio::spawn(async move { read_sse(c.get(url).send().await.unwrap()).await })
    };
    let (ea, eb) = (open(a), open(b));
    let (ea, eb) = (ea.await.unwrap(), eb.await.unwrap());
    for (id, events) in [(a, &ea), (b, &eb)] {
        assert!(events.iter().any(|e| e.0 == "step"), "{events:?}");
        assert!(
            events.iter().all(|e| e.1["job_id"] == id),
            "job {id} stream carried another job's events"
        );
        assert_eq!(events.last().unwrap().1["status"], "succeeded");
    }
    srv.stop().await;
}
