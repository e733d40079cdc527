//! `train.schedule_counts` on real data: an f16 run that starts at an absurd loss scale skips
//! its first steps; with `optimizer_steps` those skipped steps leave the noam warmup where it
//! was, with `all_steps` (PyTorch's usual loop) they advance it.

mod tiny;

use ampserve::config::{Precision, Schedule, ScheduleCounts, TrainSpec};
use ampserve::train::StepRecord;

const WARMUP: usize = 20;

fn spec(counts: ScheduleCounts) -> TrainSpec {
    let mut s = tiny::tiny_spec("schedule");
    s.train.precision = Precision::F16;
    s.amp.init_scale = 2f64.powi(30);
    s.train.schedule = Schedule::Noam;
    s.train.warmup_steps = WARMUP;
    s.train.schedule_counts = counts;
    s.train.epochs = 2;
    s.train.max_steps = 30;
    s.checkpoint.every_steps = 0;
    s
}

fn steps(spec: &TrainSpec) -> Vec<StepRecord> {
    let dir = tempfile::tempdir().unwrap();
    tiny::step_records(spec, dir.path(), false, None)
}

/// The noam learning rate at schedule step `s` (1-based).
fn noam(base: f64, s: u64) -> f64 {
    let (s, w) = (s as f64, WARMUP as f64);
    base * (s / w).min((w / s).sqrt())
}

fn leading_skips(steps: &[StepRecord]) -> usize {
    steps.iter().take_while(|r| r.skipped).count()
}

#[test]
fn optimizer_steps_leaves_the_schedule_where_it_was_on_skipped_steps() {
    let spec = spec(ScheduleCounts::OptimizerSteps);
    let steps = steps(&spec);
    let skips = leading_skips(&steps);
    assert!(
        skips >= 3,
        "2^30 must overflow f16 gradients: {skips} skips"
    );
    let mut applied = 0u64;
    for r in &steps {
        let want = noam(spec.train.lr, applied + 1);
        assert!(
            (r.lr - want).abs() <= 1e-12 * want.max(1.0),
            "step {} (after {applied} applied): lr {} != {want}",
            r.step,
            r.lr
        );
        if !r.skipped {
            applied += 1;
        }
    }
    // the first update runs at the first warmup lr, however many steps were skipped before it
    assert_eq!(steps[skips].lr, noam(spec.train.lr, 1));
}

#[test]
fn all_steps_advances_the_schedule_on_skipped_steps_too() {
    let spec = spec(ScheduleCounts::AllSteps);
    let steps = steps(&spec);
    let skips = leading_skips(&steps);
    assert!(
        skips >= 3,
        "2^30 must overflow f16 gradients: {skips} skips"
    );
    for r in &steps {
        let want = noam(spec.train.lr, r.step);
        assert!(
            (r.lr - want).abs() <= 1e-12 * want.max(1.0),
            "step {}: lr {} != {want}",
            r.step,
            r.lr
        );
    }
    // the first update already runs further up the warmup ramp
    assert_eq!(steps[skips].lr, noam(spec.train.lr, skips as u64 + 1));
    assert!(steps[skips].lr > noam(spec.train.lr, 1));
}
