//! Checkpoint averaging at export, on a tiny model trained on real Tatoeba en-it pairs: the
//! exported weights are the mean of the last N checkpoints' master weights, the averaged model
//! translates, and asking for more checkpoints than exist is a clear error.

mod tiny;
use tiny::tiny_spec;

use ampserve::checkpoint;
use ampserve::config::TrainSpec;
use ampserve::infer::{export, CheckpointChoice, DecodeOptions, InferError, Translator};
use ampserve::train::{self, RunOptions};
use candle_core::{DType, Device, Tensor};
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// 30 steps with a checkpoint every 10 and at each epoch end; the last 3 are kept.
fn spec(average_last: usize) -> TrainSpec {
    let mut s = tiny_spec("avg");
    s.train.epochs = 100;
    s.train.max_steps = 30;
    s.train.valid_max_sentences = 8;
    s.checkpoint.every_steps = 10;
    s.checkpoint.keep_last = 3;
    s.checkpoint.average_last = average_last;
    s
}

fn train_run(spec: &TrainSpec, dir: &Path) {
    let opts = RunOptions {
        out_dir: dir.to_path_buf(),
        device: Device::Cpu,
        resume: false,
        barrier: None,
    };
    train::run(spec, &opts, &mut |_| {}, &AtomicBool::new(false)).expect("training failed");
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn averaged_export_holds_the_mean_of_the_last_n_checkpoints_and_translates() {
    let root = tempfile::tempdir().unwrap();
    let run_dir = root.path().join("run");
    train_run(&spec(0), &run_dir);
    let ckpts = checkpoint::list(&run_dir.join("checkpoints"));
    let steps: Vec<u64> = ckpts.iter().map(|(m, _)| m.step).collect();
    assert_eq!(steps.len(), 3, "{steps:?}");

    let out = root.path().join("avg");
    let m = export::export_averaged(
        &run_dir,
        CheckpointChoice::Latest,
        &out,
        "avg",
        None,
        Some(2),
    )
    .unwrap();
    assert_eq!(m.averaged_steps, steps[1..].to_vec());
    let exported =
        candle_core::safetensors::load(out.join(export::WEIGHTS_FILE), &Device::Cpu).unwrap();
    let a = checkpoint::load_tensors(&ckpts[1].1, &Device::Cpu).unwrap();
    let b = checkpoint::load_tensors(&ckpts[2].1, &Device::Cpu).unwrap();
    let mut moved = 0;
    for (name, w) in &exported {
        let (x, y) = (&a[&format!("param.{name}")], &b[&format!("param.{name}")]);
        let mean = ((x + y).unwrap() / 2.0).unwrap();
        let tol = 2e-3 * (1.0 + max_abs_diff(&mean, &mean.zeros_like().unwrap()));
        assert!(max_abs_diff(w, &mean) <= tol, "{name}: not the mean");
        // where the two checkpoints differ by more than 4 tol, the mean is more than 2 tol from
        // either of them (and so, at most tol off the mean, more than tol from the latest)
        if max_abs_diff(x, y) > 4.0 * tol {
            // and, where the two checkpoints differ, not either of them
            assert!(max_abs_diff(w, y) > tol, "{name}: the latest, not the mean");
            moved += 1;
        }
    }
    assert!(
        moved > 0,
        "the checkpoints do not differ; the test proves nothing"
    );

    let t = Translator::load(&out, &Device::Cpu, None).unwrap();
    let r = t
        .translate(&["Tom is here."], &DecodeOptions::default(), None)
        .unwrap();
    assert!(!r[0].text.is_empty());
}

#[test]
fn the_spec_field_makes_the_default_export_average_the_last_checkpoints() {
    let root = tempfile::tempdir().unwrap();
    let run_dir = root.path().join("run");
    train_run(&spec(3), &run_dir);
    let m = export::export(
        &run_dir,
        CheckpointChoice::Best,
        &root.path().join("m"),
        "m",
        None,
    )
    .unwrap();
    let steps: Vec<u64> = checkpoint::list(&run_dir.join("checkpoints"))
        .iter()
        .map(|(m, _)| m.step)
        .collect();
    assert_eq!(steps.len(), 3);
    assert_eq!(m.averaged_steps, steps);
    assert_eq!(m.step, 30);
    assert_eq!(m.val_bleu, None, "an averaged model was never validated");
}

#[test]
fn averaging_more_checkpoints_than_exist_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let run_dir = root.path().join("run");
    train_run(&spec(0), &run_dir);
    let second = checkpoint::list(&run_dir.join("checkpoints"))[1].0.step;
    let e = export::export_averaged(
        &run_dir,
        CheckpointChoice::Step(second),
        &root.path().join("m"),
        "m",
        None,
        Some(3),
    )
    .unwrap_err();
    assert!(matches!(e, InferError::NotFound(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("average_last = 3") && msg.contains("has 2"),
        "{msg}"
    );
    assert!(!root.path().join("m").exists());
}
