//! Shared by the library-level training tests (averaging, stopping, scores): the bundled Tatoeba
//! en-it files and the tiny spec they all start from, so each test states only what it changes.
#![allow(dead_code)]

use ampserve::config::{Precision, TrainSpec};
use std::path::{Path, PathBuf};

/// A file of the bundled Tatoeba en-it corpus.
pub fn data(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/tatoeba-en-it")
        .join(file)
}

/// 400 pairs of at most 12 tokens, a 1-layer d_model 32 model in fp32, batch 16, lr 3e-3,
/// validation without samples.
pub fn tiny_spec(name: &str) -> TrainSpec {
    let mut s = TrainSpec {
        name: name.into(),
        ..TrainSpec::default()
    };
    s.data.train = data("train.en-it.tsv");
    s.data.valid = Some(data("valid.en-it.tsv"));
    s.data.max_train_pairs = 400;
    s.data.max_len = 12;
    s.model.d_model = 32;
    s.model.layers = 1;
    s.model.heads = 2;
    s.model.d_ff = 64;
    s.train.precision = Precision::Fp32;
    s.train.batch_size = 16;
    s.train.lr = 3e-3;
    s.train.valid_samples = 0;
    s
}

/// Options for a run on the CPU in `dir` (a fresh run, or a resume of the run there).
pub fn cpu_run(dir: &Path, resume: bool) -> ampserve::train::RunOptions {
    ampserve::train::RunOptions {
        out_dir: dir.to_path_buf(),
        device: candle_core::Device::Cpu,
        resume,
        barrier: None,
    }
}

/// The step records of a CPU run in `dir`; with `stop_after`, the run is cancelled once that many
/// steps have been recorded (it checkpoints and returns).
pub fn step_records(
    spec: &TrainSpec,
    dir: &Path,
    resume: bool,
    stop_after: Option<u64>,
) -> Vec<ampserve::train::StepRecord> {
    use ampserve::train::TrainEvent;
    use std::sync::atomic::{AtomicBool, Ordering};
    let cancel = AtomicBool::new(false);
    let mut out = Vec::new();
    ampserve::train::run(
        spec,
        &cpu_run(dir, resume),
        &mut |e| {
            if let TrainEvent::Step(s) = e {
                if stop_after == Some(s.step) {
                    cancel.store(true, Ordering::Relaxed);
                }
                out.push(s)
            }
        },
        &cancel,
    )
    .expect("training run failed");
    out
}
