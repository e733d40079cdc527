//! `train.schedule = "linear"` on real data: after its warm-up the learning rate falls in a
//! straight line to zero at the end of whichever budget runs out first, `max_steps` or `epochs`,
//! and a run stopped and resumed reads the same learning rates as the uninterrupted run.

mod tiny;

use ampserve::config::{Schedule, TrainSpec};
use ampserve::train::StepRecord;
use std::path::Path;

const WARMUP: u64 = 5;

fn spec() -> TrainSpec {
    let mut s = tiny::tiny_spec("linear");
    s.train.schedule = Schedule::Linear;
    s.train.warmup_steps = WARMUP as usize;
    s.train.valid_every = 0;
    s.checkpoint.every_steps = 0;
    s
}

fn steps(spec: &TrainSpec, dir: &Path, resume: bool, stop_after: Option<u64>) -> Vec<StepRecord> {
    tiny::step_records(spec, dir, resume, stop_after)
}

/// The warm-up ramp at 1-based step `k`.
fn warm(k: u64) -> f64 {
    (k as f64 / WARMUP as f64).min(1.0)
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-12 * want.abs().max(1e-3),
        "{what}: lr {got} != {want}"
    );
}

#[test]
fn linear_falls_to_zero_at_max_steps_after_its_warmup() {
    let mut s = spec();
    s.train.epochs = 1000;
    s.train.max_steps = 30;
    let dir = tempfile::tempdir().unwrap();
    let run = steps(&s, dir.path(), false, None);
    assert_eq!(run.len(), 30);
    let base = s.train.lr;
    for r in &run {
        // before step k, k - 1 of the 30 steps are used
        let want = base * warm(r.step) * (1.0 - (r.step - 1) as f64 / 30.0);
        assert_close(r.lr, want, &format!("step {}", r.step));
    }
    assert!(run[4].lr > run[5].lr && run[5].lr > run[29].lr);
    assert_close(run[29].lr, base / 30.0, "the last step");
}

#[test]
fn linear_follows_the_epochs_when_they_end_first() {
    let mut s = spec();
    s.train.epochs = 2;
    s.train.max_steps = 0;
    let dir = tempfile::tempdir().unwrap();
    let run = steps(&s, dir.path(), false, None);
    let per_epoch = run.iter().filter(|r| r.epoch == 0).count() as u64;
    assert!(per_epoch > WARMUP, "{per_epoch} steps per epoch");
    assert_eq!(run.len() as u64, 2 * per_epoch);
    let base = s.train.lr;
    for r in &run {
        let used = (r.step - 1) as f64 / (2 * per_epoch) as f64;
        assert_close(
            r.lr,
            base * warm(r.step) * (1.0 - used),
            &format!("step {}", r.step),
        );
    }
    // the second epoch starts at half the peak
    let first_of_second = run.iter().find(|r| r.epoch == 1).unwrap();
    assert_close(
        first_of_second.lr,
        base * 0.5,
        "the second epoch's first step",
    );
}

#[test]
fn linear_resumed_after_a_stop_reads_the_learning_rates_of_the_uninterrupted_run() {
    let mut s = spec();
    s.train.epochs = 1000;
    s.train.max_steps = 24;
    let whole = steps(&s, tempfile::tempdir().unwrap().path(), false, None);
    let dir = tempfile::tempdir().unwrap();
    let first = steps(&s, dir.path(), false, Some(11));
    assert_eq!(first.len(), 11);
    let rest = steps(&s, dir.path(), true, None);
    assert_eq!(rest.first().map(|r| r.step), Some(12));
    let joined: Vec<(u64, f64, f64)> = first
        .iter()
        .chain(&rest)
        .map(|r| (r.step, r.lr, r.loss))
        .collect();
    let want: Vec<(u64, f64, f64)> = whole.iter().map(|r| (r.step, r.lr, r.loss)).collect();
    assert_eq!(joined, want);
}
