//! `amp.on_scale_collapse` on real data: an f16 run whose loss scale collapses (a test-only
//! inf written into one gradient, `amp.test_inject_inf`, from step 6 on) fails, switches to
//! bf16 from its last good checkpoint, or rolls back with the learning rate halved.

mod tiny;

use ampserve::checkpoint;
use ampserve::config::{InjectInf, OnScaleCollapse, Precision, TrainSpec};
use ampserve::train::{self, RecoveryRecord, RunOptions, StepRecord, TrainError, TrainEvent};
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// Scale 4 -> 2 -> 1 on steps 6 and 7, then three overflows at the floor: collapsed at step 10.
/// Checkpoints at steps 4 and 8 (the one at 8 is inside the overflows, so not a good one).
fn spec(on: OnScaleCollapse, injections: u64) -> TrainSpec {
    let mut s = tiny::tiny_spec("recovery");
    s.train.precision = Precision::F16;
    s.train.max_steps = 20;
    s.amp.init_scale = 4.0;
    s.amp.min_scale = 1.0;
    s.amp.max_consecutive_skips = 3;
    s.amp.on_scale_collapse = on;
    s.amp.test_inject_inf = Some(InjectInf {
        tensor: "decoder.layers.0.ffn.linear_2.weight".into(),
        from_step: 6,
        count: injections,
    });
    s.checkpoint.every_steps = 4;
    s
}

fn run(spec: &TrainSpec, dir: &Path) -> (Result<train::Summary, TrainError>, Vec<TrainEvent>) {
    let opts = RunOptions {
        out_dir: dir.to_path_buf(),
        device: candle_core::Device::Cpu,
        resume: false,
        barrier: None,
    };
    let mut events = Vec::new();
    let r = train::run(
        spec,
        &opts,
        &mut |e| events.push(e),
        &AtomicBool::new(false),
    );
    (r, events)
}

fn recoveries(events: &[TrainEvent]) -> Vec<RecoveryRecord> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Recovery(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// Step events after the last recovery.
fn steps_after_recovery(events: &[TrainEvent]) -> Vec<StepRecord> {
    let at = events
        .iter()
        .rposition(|e| matches!(e, TrainEvent::Recovery(_)))
        .expect("a recovery event");
    events[at..]
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn jsonl_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<StepRecord>(l).unwrap().step)
        .collect()
}

#[test]
fn fail_keeps_failing_the_run_when_the_scale_collapses() {
    let dir = tempfile::tempdir().unwrap();
    let (r, events) = run(&spec(OnScaleCollapse::Fail, 1000), dir.path());
    match r {
        Err(TrainError::Scaler(e)) => assert!(e.to_string().contains("min_scale"), "{e}"),
        other => panic!("expected a scaler failure, got {other:?}"),
    }
    assert!(recoveries(&events).is_empty());
}

#[test]
fn bf16_turns_a_collapsing_f16_run_into_a_bf16_run_that_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (r, events) = run(&spec(OnScaleCollapse::Bf16, 1000), dir.path());
    let summary = r.expect("the run recovers and finishes");
    assert_eq!(summary.steps, 20);
    let rec = recoveries(&events);
    assert_eq!(rec.len(), 1, "{rec:?}");
    assert_eq!(
        (
            rec[0].step,
            rec[0].action.as_str(),
            rec[0].resumed_from_step,
            rec[0].precision.as_str()
        ),
        (10, "bf16", 4, "bf16")
    );
    // from the checkpoint at step 4 on: bf16, no loss scaling, nothing skipped
    let after = steps_after_recovery(&events);
    assert_eq!(after.first().unwrap().step, 5);
    assert_eq!(after.last().unwrap().step, 20);
    assert!(after
        .iter()
        .all(|s| s.loss_scale == 1.0 && !s.skipped && s.loss.is_finite()));
    // the metrics file holds each step once: the replayed ones replaced the collapsed ones
    assert_eq!(jsonl_steps(dir.path()), (1..=20).collect::<Vec<_>>());
    // checkpoints written after the switch record it
    let (meta, _) = checkpoint::list(&dir.path().join("checkpoints"))
        .pop()
        .unwrap();
    assert_eq!(meta.step, 20);
    assert_eq!(meta.spec.train.precision, Precision::Bf16);
}

#[test]
fn after_a_bf16_switch_the_summary_still_counts_the_steps_skipped_before_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(OnScaleCollapse::Bf16, 1000);
    // a scale far above f16's range: the first steps overflow and back off on their own, before
    // the checkpoint the recovery goes back to
    s.amp.init_scale = 2f64.powi(24);
    s.amp.min_scale = 2f64.powi(14);
    s.checkpoint.every_steps = 8;
    s.amp.test_inject_inf.as_mut().unwrap().from_step = 10;
    let (r, events) = run(&s, dir.path());
    let summary = r.expect("the run recovers and finishes");
    let rec = recoveries(&events);
    let trace: Vec<(u64, f64, bool)> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(st) => Some((st.step, st.loss_scale, st.skipped)),
            _ => None,
        })
        .collect();
    assert_eq!(rec.len(), 1, "{rec:?} {trace:?}");
    let kept_before: Vec<StepRecord> = events
        .iter()
        .take_while(|e| !matches!(e, TrainEvent::Recovery(_)))
        .filter_map(|e| match e {
            TrainEvent::Step(st) if st.step <= rec[0].resumed_from_step => Some(st.clone()),
            _ => None,
        })
        .collect();
    let skipped_kept = kept_before.iter().filter(|st| st.skipped).count() as u64
        + steps_after_recovery(&events)
            .iter()
            .filter(|st| st.skipped)
            .count() as u64;
    assert!(
        skipped_kept > 0,
        "the huge initial scale skipped early steps"
    );
    assert_eq!(summary.skipped_steps, skipped_kept);
}

#[test]
fn rollback_halves_the_learning_rate_and_continues_from_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // exactly the five injections that collapse the scale once
    let spec = spec(OnScaleCollapse::Rollback, 5);
    let (r, events) = run(&spec, dir.path());
    assert_eq!(r.expect("the run rolls back and finishes").steps, 20);
    let rec = recoveries(&events);
    assert_eq!(rec.len(), 1, "{rec:?}");
    assert_eq!(
        (
            rec[0].step,
            rec[0].action.as_str(),
            rec[0].resumed_from_step,
            rec[0].rollbacks
        ),
        (10, "rollback", 4, 1)
    );
    assert_eq!(rec[0].lr, spec.train.lr / 2.0);
    assert_eq!(rec[0].precision, "f16");
    let after = steps_after_recovery(&events);
    assert_eq!(after.first().unwrap().step, 5);
    // still f16 with the checkpoint's scale, at the halved (constant) learning rate
    assert_eq!(after[0].loss_scale, 4.0);
    assert!(after
        .iter()
        .all(|s| s.lr == spec.train.lr / 2.0 && !s.skipped));
    assert_eq!(jsonl_steps(dir.path()), (1..=20).collect::<Vec<_>>());
}

#[test]
fn rollback_gives_up_after_max_rollbacks() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(OnScaleCollapse::Rollback, 1000);
    spec.amp.max_rollbacks = 2;
    let (r, events) = run(&spec, dir.path());
    match r {
        Err(e @ TrainError::RollbacksExhausted { .. }) => {
            assert!(e.to_string().contains("amp.max_rollbacks"), "{e}")
        }
        other => panic!("expected a scaler failure, got {other:?}"),
    }
    let lrs: Vec<f64> = recoveries(&events).iter().map(|r| r.lr).collect();
    assert_eq!(lrs, [spec.train.lr / 2.0, spec.train.lr / 4.0]);
}
