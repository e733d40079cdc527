//! Stopping rules on a tiny model trained on real Tatoeba en-it pairs: early stopping ends the
//! run after `patience` validations without a new best, and `max_time_s` ends it within one step
//! of its budget; both end cleanly with a validation and a checkpoint at the last step.

mod tiny;
use tiny::tiny_spec;

use ampserve::config::{EarlyStopping, StopMetric, TrainSpec};
use ampserve::train::{self, RunOptions, TrainEvent};
use candle_core::Device;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

fn spec() -> TrainSpec {
    let mut s = tiny_spec("stop");
    s.train.epochs = 1000;
    s.train.max_steps = 2000;
    s.train.valid_max_sentences = 16;
    s.checkpoint.every_steps = 0;
    s.checkpoint.keep_last = 2;
    s
}

fn run(spec: &TrainSpec, dir: &Path) -> (Vec<(Instant, TrainEvent)>, train::Summary) {
    let mut events = Vec::new();
    let opts = RunOptions {
        out_dir: dir.to_path_buf(),
        device: Device::Cpu,
        resume: false,
        barrier: None,
    };
    let s = train::run(
        spec,
        &opts,
        &mut |e| events.push((Instant::now(), e)),
        &AtomicBool::new(false),
    )
    .expect("training failed");
    (events, s)
}

fn last_checkpoint_step(events: &[(Instant, TrainEvent)]) -> Option<u64> {
    events.iter().rev().find_map(|(_, e)| match e {
        TrainEvent::Checkpoint(c) => Some(c.step),
        _ => None,
    })
}

#[test]
fn early_stopping_ends_the_run_after_patience_validations_without_a_new_best() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec();
    // a learning rate so small the BLEU of the 16 sentences cannot keep improving
    s.train.lr = 1e-7;
    s.train.valid_every = 2;
    s.train.early_stopping = Some(EarlyStopping {
        metric: StopMetric::Bleu,
        patience: 3,
    });
    let (events, summary) = run(&s, dir.path());
    let vals: Vec<(u64, f64)> = events
        .iter()
        .filter_map(|(_, e)| match e {
            TrainEvent::Validation(v) => Some((v.step, v.bleu)),
            _ => None,
        })
        .collect();
    // replay the rule: the run must end at the first validation that is the 3rd in a row
    // without a strictly better BLEU
    let (mut best, mut bad, mut want) = (f64::NEG_INFINITY, 0, None);
    for &(step, b) in &vals {
        if b > best {
            best = b;
            bad = 0;
        } else {
            bad += 1;
        }
        if bad == 3 {
            want = Some(step);
            break;
        }
    }
    let want = want.expect("the BLEU kept improving; the test needs a plateau");
    assert_eq!(summary.steps, want, "validations {vals:?}");
    assert_eq!(vals.last().unwrap().0, want, "no validation after the stop");
    assert_eq!(summary.stopped_by.as_deref(), Some("early_stopping"));
    assert_eq!(last_checkpoint_step(&events), Some(want));
    assert!(!summary.cancelled);
}

#[test]
fn max_time_s_stops_within_one_step_of_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec();
    s.train.max_time_s = 2.0;
    let t0 = Instant::now();
    let (events, summary) = run(&s, dir.path());
    assert_eq!(summary.stopped_by.as_deref(), Some("max_time_s"));
    assert!(
        summary.steps > 0 && summary.steps < 2000,
        "{} steps",
        summary.steps
    );
    let steps: Vec<(Instant, f64)> = events
        .iter()
        .filter_map(|(t, e)| match e {
            TrainEvent::Step(r) => Some((*t, r.step_ms)),
            _ => None,
        })
        .collect();
    let (last_at, _) = *steps.last().unwrap();
    let longest = steps.iter().map(|(_, ms)| *ms).fold(0.0, f64::max) / 1e3;
    let budget = s.train.max_time_s;
    let ended = last_at.duration_since(t0).as_secs_f64();
    // the last step started before the budget ran out, so it ended within one step of it
    assert!(
        ended <= budget + longest + 0.05,
        "last step ended at {ended:.3}s, budget {budget}s, longest step {longest:.3}s"
    );
    // and no step was left unstarted while time remained: one more step would have overrun
    assert!(
        ended + 0.5 >= budget - longest,
        "stopped early at {ended:.3}s"
    );
    // clean ending: a validation and a checkpoint at the last step
    let last_val = events.iter().rev().find_map(|(_, e)| match e {
        TrainEvent::Validation(v) => Some(v.step),
        _ => None,
    });
    assert_eq!(last_val, Some(summary.steps));
    assert_eq!(last_checkpoint_step(&events), Some(summary.steps));
}
