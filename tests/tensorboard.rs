//! A real tiny training run on the bundled Tatoeba sample writes TensorBoard event files in its
//! run directory; read back with the crate's reader (every crc checked), they hold the same
//! scalars as `metrics.jsonl` and `validations.jsonl`, and a resume continues in a new file.

use ampserve::config::{Precision, TrainSpec};
use ampserve::train::tensorboard::{event_files, read_events, EventRead, FILE_VERSION};
use ampserve::train::{self, RunOptions};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

fn tiny_spec(steps: usize) -> TrainSpec {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tatoeba-en-it");
    let mut s = TrainSpec {
        name: "tb".into(),
        ..TrainSpec::default()
    };
    s.data.train = data.join("train.en-it.tsv");
    s.data.valid = Some(data.join("valid.en-it.tsv"));
    s.data.max_train_pairs = 200;
    s.data.max_len = 16;
    s.model.d_model = 16;
    s.model.layers = 1;
    s.model.heads = 2;
    s.model.d_ff = 32;
    s.train.precision = Precision::F16;
    // A huge initial scale makes the first steps overflow f16: skipped steps to log.
    s.amp.init_scale = 2f64.powi(24);
    s.train.batch_size = 16;
    s.train.epochs = 100;
    s.train.max_steps = steps;
    s.train.valid_every = 4;
    s.train.valid_max_sentences = 8;
    s.train.valid_samples = 0;
    s.checkpoint.every_steps = 4;
    s
}

fn run(spec: &TrainSpec, dir: &Path, resume: bool) {
    let opts = RunOptions {
        out_dir: dir.to_path_buf(),
        device: candle_core::Device::Cpu,
        resume,
        barrier: None,
    };
    train::run(spec, &opts, &mut |_| {}, &AtomicBool::new(false)).expect("training run");
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// tag -> step -> value, over the given event files in order (a later file wins a step).
fn scalars(files: &[std::path::PathBuf]) -> BTreeMap<String, BTreeMap<i64, f32>> {
    let mut out: BTreeMap<String, BTreeMap<i64, f32>> = BTreeMap::new();
    for f in files {
        let events: Vec<EventRead> = read_events(f).expect("event file reads with valid crcs");
        assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
        assert!(events[0].wall_time > 1.6e9, "{:?}", events[0]);
        for e in &events[1..] {
            for (tag, v) in &e.scalars {
                out.entry(tag.clone()).or_default().insert(e.step, *v);
            }
        }
    }
    out
}

fn same(a: f32, b: f64, what: &str) {
    assert_eq!(a, b as f32, "{what}");
}

#[test]
fn a_run_writes_tensorboard_scalars_matching_its_jsonl_logs() {
    let dir = tempfile::tempdir().unwrap();
    run(&tiny_spec(8), dir.path(), false);
    let files = event_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let s = scalars(&files);

    let metrics = jsonl(&dir.path().join("metrics.jsonl"));
    assert_eq!(metrics.len(), 8);
    let mut skipped = 0;
    for m in &metrics {
        let step = m["step"].as_i64().unwrap();
        for (tag, key) in [
            ("train/loss", "loss"),
            ("train/lr", "lr"),
            ("train/tokens_per_s", "tokens_per_s"),
            ("amp/loss_scale", "loss_scale"),
        ] {
            same(
                s[tag][&step],
                m[key].as_f64().unwrap(),
                &format!("{tag}@{step}"),
            );
        }
        // Overflowing steps have a non-finite grad norm: null in JSONL, inf/NaN in the file.
        let g = s["train/grad_norm"][&step];
        match m["grad_norm"].as_f64() {
            Some(v) => same(g, v, &format!("grad_norm@{step}")),
            None => assert!(!g.is_finite(), "grad_norm@{step}: {g}"),
        }
        let sk = m["skipped"].as_bool().unwrap();
        skipped += sk as u32;
        assert_eq!(s["amp/skipped"][&step], sk as u8 as f32);
        assert_eq!(s["amp/skipped_total"][&step], skipped as f32);
    }
    assert!(skipped > 0, "the 2^24 initial scale must skip steps");

    let vals = jsonl(&dir.path().join("validations.jsonl"));
    assert_eq!(vals.len(), 2, "steps 4 and 8");
    for v in &vals {
        let step = v["step"].as_i64().unwrap();
        for (tag, key) in [
            ("valid/loss", "val_loss"),
            ("valid/bleu", "bleu"),
            ("valid/chrf", "chrf"),
            ("valid/cer", "cer"),
            ("valid/wer", "wer"),
        ] {
            same(
                s[tag][&step],
                v[key].as_f64().unwrap(),
                &format!("{tag}@{step}"),
            );
        }
    }
    assert_eq!(s["valid/bleu"].len(), 2);
}

#[test]
fn a_resumed_run_continues_in_a_new_event_file_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    run(&tiny_spec(4), dir.path(), false);
    run(&tiny_spec(8), dir.path(), true);
    let files = event_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let second = scalars(&files[1..]);
    let steps: Vec<i64> = second["train/loss"].keys().copied().collect();
    assert_eq!(steps, [5, 6, 7, 8]);
    // The cumulative skipped count carries over from the first part of the run.
    let metrics = jsonl(&dir.path().join("metrics.jsonl"));
    let total = metrics
        .iter()
        .filter(|m| m["skipped"].as_bool() == Some(true))
        .count();
    assert_eq!(second["amp/skipped_total"][&8], total as f32);
    let all = scalars(&files);
    assert_eq!(all["train/loss"].len(), 8);
}
