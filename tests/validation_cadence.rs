//! When a run validates, on real Tatoeba en-it pairs: at each epoch's end by default, at every
//! N-th with `train.valid_every_epochs = N`, and with `valid_every_epochs = 0` only every
//! `valid_every` steps and at the run's end.

mod tiny;

use ampserve::config::TrainSpec;
use ampserve::train::{self, TrainEvent};
use std::sync::atomic::AtomicBool;

fn spec(epochs: usize, valid_every: usize, valid_every_epochs: usize) -> TrainSpec {
    let mut s = tiny::tiny_spec("cadence");
    s.data.max_train_pairs = 160; // 10 batches of 16 per epoch
    s.train.epochs = epochs;
    s.train.valid_every = valid_every;
    s.train.valid_every_epochs = valid_every_epochs;
    s.train.valid_max_sentences = 8;
    s.checkpoint.every_steps = 0;
    s
}

/// (steps per epoch, the steps at which the run validated).
fn validations(spec: &TrainSpec) -> (u64, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let opts = tiny::cpu_run(dir.path(), false);
    let mut per_epoch = 0;
    let mut at = Vec::new();
    train::run(
        spec,
        &opts,
        &mut |e| match e {
            TrainEvent::Started(s) => per_epoch = s.steps_per_epoch,
            TrainEvent::Validation(v) => at.push(v.step),
            _ => {}
        },
        &AtomicBool::new(false),
    )
    .expect("training run failed");
    (per_epoch, at)
}

#[test]
fn every_epoch_end_validates_by_default() {
    let (e, at) = validations(&spec(3, 0, 1));
    assert!(e >= 5, "{e} steps per epoch");
    assert_eq!(at, vec![e, 2 * e, 3 * e]);
}

#[test]
fn valid_every_epochs_validates_at_every_nth_epoch_end_and_at_the_run_end() {
    let (e, at) = validations(&spec(5, 0, 2));
    assert_eq!(at, vec![2 * e, 4 * e, 5 * e]);
}

#[test]
fn valid_every_epochs_zero_leaves_the_cadence_to_valid_every() {
    let (e, at) = validations(&spec(3, 7, 0));
    let mut want: Vec<u64> = (1..).map(|k| 7 * k).take_while(|s| *s <= 3 * e).collect();
    if want.last() != Some(&(3 * e)) {
        want.push(3 * e); // the run's end
    }
    assert_eq!(at, want);
}
