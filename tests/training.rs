//! End-to-end training on real Tatoeba en-it pairs with a tiny model: loss falls in every
//! precision, the loss scaler backs off from an absurd initial scale, and resume is exact.

use ampserve::config::{Precision, TrainSpec};
use ampserve::train::{self, RunOptions, StepRecord, TrainEvent};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn data(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/tatoeba-en-it")
        .join(file)
}

fn tiny_spec(precision: Precision, steps: usize) -> TrainSpec {
    let mut s = TrainSpec {
        name: "test".into(),
        ..TrainSpec::default()
    };
    s.data.train = data("train.en-it.tsv");
    s.data.valid = Some(data("valid.en-it.tsv"));
    s.data.max_train_pairs = 400;
    s.data.max_len = 20;
    s.model.d_model = 32;
    s.model.layers = 1;
    s.model.heads = 2;
    s.model.d_ff = 64;
    s.model.dropout = 0.1;
    s.train.precision = precision;
    s.train.batch_size = 16;
    s.train.epochs = 100;
    s.train.max_steps = steps;
    s.train.lr = 3e-3;
    s.train.valid_max_sentences = 16;
    s.train.valid_samples = 1;
    s.checkpoint.every_steps = 0;
    s.checkpoint.keep_last = 2;
    s
}

struct Outcome {
    steps: Vec<StepRecord>,
    events: Vec<TrainEvent>,
    summary: train::Summary,
}

fn run(spec: &TrainSpec, dir: &Path, resume: bool) -> Outcome {
    let mut events = Vec::new();
    let opts = RunOptions {
        out_dir: dir.to_path_buf(),
        device: candle_core::Device::Cpu,
        resume,
        barrier: None,
    };
    let summary = train::run(
        spec,
        &opts,
        &mut |e| events.push(e),
        &AtomicBool::new(false),
    )
    .expect("training run failed");
    let steps = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    Outcome {
        steps,
        events,
        summary,
    }
}

fn mean_loss(s: &[StepRecord]) -> f64 {
    let v: Vec<f64> = s.iter().filter(|r| !r.skipped).map(|r| r.loss).collect();
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn loss_falls_in_every_precision_and_mixed_tracks_fp32() {
    let steps = 120;
    let mut finals = Vec::new();
    for p in [Precision::Fp32, Precision::F16, Precision::Bf16] {
        let dir = tempfile::tempdir().unwrap();
        let o = run(&tiny_spec(p, steps), dir.path(), false);
        assert_eq!(o.steps.len(), steps, "{p}");
        let first = mean_loss(&o.steps[..10]);
        let last = mean_loss(&o.steps[steps - 10..]);
        eprintln!(
            "{p}: first {first:.3} last {last:.3} skipped {}",
            o.summary.skipped_steps
        );
        assert!(
            last < first - 1.5,
            "{p}: loss did not fall clearly: {first:.3} -> {last:.3}"
        );
        // every step record is complete and finite where it should be
        for r in &o.steps {
            assert!(r.lr > 0.0 && r.step_ms > 0.0 && r.tokens_per_s > 0.0);
            if !r.skipped {
                assert!(r.loss.is_finite() && r.grad_norm.is_finite());
            }
        }
        if p == Precision::F16 {
            assert_eq!(
                o.steps[0].loss_scale, 65536.0,
                "f16 starts at PyTorch's init_scale"
            );
        } else {
            assert!(
                o.steps.iter().all(|r| r.loss_scale == 1.0),
                "{p}: scaler disabled by default"
            );
        }
        // metrics.jsonl has one line per step
        let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), steps);
        finals.push(last);
    }
    let (fp32, f16, bf16) = (finals[0], finals[1], finals[2]);
    assert!(
        (f16 - fp32).abs() < 0.15 * fp32,
        "f16 {f16:.3} vs fp32 {fp32:.3}"
    );
    assert!(
        (bf16 - fp32).abs() < 0.15 * fp32,
        "bf16 {bf16:.3} vs fp32 {fp32:.3}"
    );
}

#[test]
fn huge_initial_scale_skips_backs_off_and_still_learns() {
    let mut spec = tiny_spec(Precision::F16, 90);
    spec.amp.init_scale = 2f64.powi(40);
    spec.amp.growth_interval = 20;
    let dir = tempfile::tempdir().unwrap();
    let o = run(&spec, dir.path(), false);
    let skipped: Vec<&StepRecord> = o.steps.iter().filter(|r| r.skipped).collect();
    assert!(!skipped.is_empty(), "2^40 must overflow f16 gradients");
    assert!(skipped.iter().all(|r| r.found_inf));
    // each overflow halves the scale
    let first = o.steps.iter().position(|r| r.skipped).unwrap();
    assert_eq!(
        o.steps[first + 1].loss_scale,
        o.steps[first].loss_scale / 2.0
    );
    let final_scale = o.summary.final_loss_scale;
    assert!(
        final_scale < 2f64.powi(40) && final_scale >= 1.0,
        "scale {final_scale}"
    );
    assert_eq!(o.summary.skipped_steps as usize, skipped.len());
    let applied: Vec<StepRecord> = o.steps.iter().filter(|r| !r.skipped).cloned().collect();
    assert!(applied.len() > 40);
    let (a, b) = (
        mean_loss(&applied[..10]),
        mean_loss(&applied[applied.len() - 10..]),
    );
    assert!(
        b < a - 1.0,
        "still learns after backing off: {a:.3} -> {b:.3}"
    );
}

#[test]
fn resume_continues_exactly_and_keeps_scaler_state() {
    // fp32 run of 40 steps vs 25 steps + resume to 40: identical losses at every later step.
    let full_dir = tempfile::tempdir().unwrap();
    let full = run(&tiny_spec(Precision::Fp32, 40), full_dir.path(), false);

    let dir = tempfile::tempdir().unwrap();
    let first = run(&tiny_spec(Precision::Fp32, 25), dir.path(), false);
    assert_eq!(first.summary.steps, 25);
    let resumed = run(&tiny_spec(Precision::Fp32, 40), dir.path(), true);
    match &resumed.events[0] {
        TrainEvent::Started(s) => assert_eq!(s.resumed_from_step, 25),
        e => panic!("first event {e:?}"),
    }
    assert_eq!(resumed.steps.first().unwrap().step, 26);
    for r in &resumed.steps {
        let f = &full.steps[(r.step - 1) as usize];
        assert!(
            (r.loss - f.loss).abs() <= 1e-5 * f.loss.abs().max(1.0),
            "step {}: resumed {} vs uninterrupted {}",
            r.step,
            r.loss,
            f.loss
        );
    }
    // metrics.jsonl: rows replaced, not duplicated
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<StepRecord>(l).unwrap().step)
        .collect();
    assert_eq!(steps, (1..=40).collect::<Vec<_>>());

    // f16: the scaler state survives a resume
    let mut spec = tiny_spec(Precision::F16, 12);
    spec.amp.init_scale = 2f64.powi(30);
    spec.amp.growth_interval = 5;
    let d16 = tempfile::tempdir().unwrap();
    let a = run(&spec, d16.path(), false);
    spec.train.max_steps = 14;
    let b = run(&spec, d16.path(), true);
    assert_eq!(b.steps[0].loss_scale, a.summary.final_loss_scale);
    assert!(
        b.summary.skipped_steps >= a.summary.skipped_steps,
        "skip count carried over"
    );
}

#[test]
fn checkpoints_are_verified_and_retained() {
    let mut spec = tiny_spec(Precision::Bf16, 30);
    spec.checkpoint.every_steps = 5;
    spec.checkpoint.keep_last = 2;
    spec.train.valid_every = 10;
    let dir = tempfile::tempdir().unwrap();
    let o = run(&spec, dir.path(), false);
    let ck = ampserve::checkpoint::list(&dir.path().join("checkpoints"));
    // last 2 + the best by BLEU (which may be one of them)
    assert!(
        ck.len() == 2 || ck.len() == 3,
        "{} checkpoints kept",
        ck.len()
    );
    assert_eq!(ck.last().unwrap().0.step, 30);
    for (m, p) in &ck {
        assert_eq!(ampserve::checkpoint::sha256_file(p).unwrap(), m.sha256);
        assert_eq!(m.spec, spec);
    }
    let removed: usize = o
        .events
        .iter()
        .map(|e| match e {
            TrainEvent::Checkpoint(c) => c.removed.len(),
            _ => 0,
        })
        .sum();
    let written = o
        .events
        .iter()
        .filter(|e| matches!(e, TrainEvent::Checkpoint(_)))
        .count();
    assert!(written >= 6, "every 5 steps over 30 steps");
    assert_eq!(
        removed + ck.len(),
        written,
        "every written checkpoint is kept or reported removed"
    );
    // validations happened with metrics in range
    let vals: Vec<_> = o
        .events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Validation(v) => Some(v.clone()),
            _ => None,
        })
        .collect();
    let vsteps: Vec<u64> = vals.iter().map(|v| v.step).collect();
    for s in [10, 20, 30] {
        assert!(vsteps.contains(&s), "validation at step {s}: {vsteps:?}");
    }
    for v in &vals {
        assert!(
            v.val_loss.is_finite()
                && (0.0..=100.0).contains(&v.bleu)
                && (0.0..=100.0).contains(&v.chrf)
        );
        assert_eq!(v.samples.len(), 1);
    }
    // a corrupted newest checkpoint is skipped on resume: training resumes from the previous one
    let newest = &ck.last().unwrap().1;
    std::fs::write(newest, b"garbage").unwrap();
    let prev_step = ck[ck.len() - 2].0.step;
    spec.train.max_steps = 32;
    let r = run(&spec, dir.path(), true);
    match &r.events[0] {
        TrainEvent::Started(s) => assert_eq!(s.resumed_from_step, prev_step),
        e => panic!("{e:?}"),
    }
}
