//! Scores users can trust, on a tiny model trained on real Tatoeba en-it pairs: validation runs
//! on the whole validation set by default (or a sample of distinct sources), the BLEU a run
//! reports is the corpus BLEU of its own hypotheses, and `evaluate_tsv` scores a test file the
//! way the scorer does.

mod tiny;
use tiny::{data, tiny_spec};

use ampserve::config::TrainSpec;
use ampserve::infer::{evaluate_tsv, export, CheckpointChoice, DecodeOptions, Translator};
use ampserve::scores;
use ampserve::train::{self, RunOptions, TrainEvent, ValidationRecord};
use candle_core::Device;
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;

fn spec(valid_max_sentences: usize, valid_samples: usize) -> TrainSpec {
    let mut s = tiny_spec("scores");
    s.train.batch_size = 32;
    s.train.epochs = 100;
    s.train.max_steps = 30;
    s.train.valid_max_sentences = valid_max_sentences;
    s.train.valid_samples = valid_samples;
    s.checkpoint.every_steps = 0;
    s.checkpoint.keep_last = 1;
    s
}

fn run(spec: &TrainSpec, dir: &Path) -> (usize, Vec<ValidationRecord>) {
    let mut valid_pairs = 0;
    let mut vals = Vec::new();
    let opts = RunOptions {
        out_dir: dir.to_path_buf(),
        device: Device::Cpu,
        resume: false,
        barrier: None,
    };
    train::run(
        spec,
        &opts,
        &mut |e| match e {
            TrainEvent::Started(s) => valid_pairs = s.valid_pairs,
            TrainEvent::Validation(v) => vals.push(v),
            _ => {}
        },
        &AtomicBool::new(false),
    )
    .expect("training failed");
    (valid_pairs, vals)
}

#[test]
fn validation_uses_the_whole_validation_set_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(0, 0);
    assert_eq!(TrainSpec::default().train.valid_max_sentences, 0);
    let (valid_pairs, vals) = run(&s, dir.path());
    assert!(valid_pairs > 300, "{valid_pairs} validation pairs fit");
    assert!(!vals.is_empty());
    for v in &vals {
        assert_eq!(v.sentences as usize, valid_pairs);
    }
}

#[test]
fn reported_validation_bleu_is_the_corpus_bleu_of_its_own_hypotheses() {
    let dir = tempfile::tempdir().unwrap();
    // a sample of 60 with every hypothesis kept as a sample; trained long enough to score > 0
    let mut s = spec(60, 60);
    s.train.max_steps = 200;
    let (_, vals) = run(&s, dir.path());
    let v = vals.last().unwrap();
    assert_eq!(v.sentences, 60);
    assert_eq!(v.samples.len(), 60);
    let sources: HashSet<&str> = v.samples.iter().map(|s| s.source.as_str()).collect();
    assert_eq!(sources.len(), 60, "the sample repeats a source");
    let hyps: Vec<String> = v.samples.iter().map(|s| s.hypothesis.clone()).collect();
    let refs: Vec<String> = v.samples.iter().map(|s| s.reference.clone()).collect();
    let b = scores::corpus_bleu(&hyps, &refs).score;
    eprintln!("validation BLEU {b:.3}, hypotheses {:?}", &hyps[..3]);
    assert!(b > 0.0, "a model that scores 0 tests nothing");
    assert!(
        (v.bleu - b).abs() < 1e-9,
        "reported {} vs scored {b}",
        v.bleu
    );
    assert!((v.chrf - scores::corpus_chrf(&hyps, &refs)).abs() < 1e-9);
}

#[test]
fn evaluate_tsv_translates_every_line_and_scores_like_the_scorer() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    run(&spec(16, 0), &run_dir);
    let model_dir = dir.path().join("model");
    export::export(&run_dir, CheckpointChoice::Latest, &model_dir, "m", None).unwrap();
    let t = Translator::load(&model_dir, &Device::Cpu, None).unwrap();
    // the first 40 lines of the held-out test split
    let text = std::fs::read_to_string(data("test.en-it.tsv")).unwrap();
    let lines: Vec<&str> = text.lines().take(40).collect();
    let tsv = dir.path().join("test40.tsv");
    std::fs::write(&tsv, lines.join("\n") + "\n").unwrap();

    let (r, hyps) = evaluate_tsv(&t, &tsv, 1, 16).unwrap();
    assert_eq!(r.sentences, 40);
    assert_eq!(hyps.len(), 40);
    let srcs: Vec<&str> = lines
        .iter()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    let refs: Vec<String> = lines
        .iter()
        .map(|l| l.split('\t').nth(1).unwrap().trim().to_string())
        .collect();
    let direct = t.translate(&srcs, &DecodeOptions::default(), None).unwrap();
    let direct: Vec<String> = direct.into_iter().map(|x| x.text).collect();
    assert_eq!(hyps, direct, "batching changed the translations");
    let b = scores::corpus_bleu(&hyps, &refs);
    assert!((r.bleu - b.score).abs() < 1e-9);
    assert_eq!((r.sys_len, r.ref_len), (b.sys_len, b.ref_len));
    assert!((r.chrf - scores::corpus_chrf(&hyps, &refs)).abs() < 1e-9);
    assert!(r.chrf > 0.0);
}
