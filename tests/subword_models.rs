//! Subword vocabularies end to end on real Tatoeba en-it pairs: a tiny model with one joint BPE
//! or unigram vocabulary and tied embeddings trains, exports (one shared matrix) and
//! translates into text made of whole words.

use ampserve::config::{Precision, TokenizerKind, TrainSpec};
use ampserve::infer::{export, CheckpointChoice, DecodeOptions, Translator};
use ampserve::train::{self, RunOptions, TrainEvent};
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn data(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/tatoeba-en-it")
        .join(file)
}

fn tied_spec(kind: TokenizerKind) -> TrainSpec {
    let mut s = TrainSpec {
        name: "tied".into(),
        ..TrainSpec::default()
    };
    s.data.train = data("train.en-it.tsv");
    s.data.valid = Some(data("valid.en-it.tsv"));
    s.data.max_train_pairs = 400;
    s.data.max_len = 32;
    s.data.tokenizer = kind;
    s.data.vocab_size = 600;
    s.data.joint_vocab = true;
    s.model.tie_embeddings = true;
    s.model.d_model = 32;
    s.model.layers = 1;
    s.model.heads = 2;
    s.model.d_ff = 64;
    s.model.dropout = 0.0;
    s.train.precision = Precision::Fp32;
    s.train.batch_size = 32;
    s.train.epochs = 100;
    s.train.max_steps = 40;
    s.train.lr = 3e-3;
    s.train.valid_max_sentences = 8;
    s.train.valid_samples = 0;
    s.checkpoint.every_steps = 0;
    s.checkpoint.keep_last = 1;
    s
}

fn train_export_translate(kind: TokenizerKind) {
    let root = tempfile::tempdir().unwrap();
    let run_dir = root.path().join("run");
    let spec = tied_spec(kind);
    let mut losses = Vec::new();
    let mut vocab = (0, 0);
    let opts = RunOptions {
        out_dir: run_dir.clone(),
        device: Device::Cpu,
        resume: false,
        barrier: None,
    };
    train::run(
        &spec,
        &opts,
        &mut |e| match e {
            TrainEvent::Step(r) => losses.push(r.loss),
            TrainEvent::Started(s) => vocab = (s.src_vocab, s.tgt_vocab),
            _ => {}
        },
        &AtomicBool::new(false),
    )
    .expect("training failed");
    assert_eq!(vocab.0, vocab.1, "one joint vocabulary");
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(last < first * 0.9, "{kind:?}: loss {first:.3} -> {last:.3}");

    let out = root.path().join("model");
    export::export(&run_dir, CheckpointChoice::Latest, &out, "tied", None).expect("export");
    let w = candle_core::safetensors::load(out.join(export::WEIGHTS_FILE), &Device::Cpu).unwrap();
    assert_eq!(
        w[ampserve::model::SHARED_EMBED].dims(),
        &[vocab.0, spec.model.d_model]
    );
    for untied in ["src_embed.weight", "tgt_embed.weight", "projection.weight"] {
        assert!(
            !w.contains_key(untied),
            "{untied} exported beside the tied matrix"
        );
    }
    assert!(w.contains_key("projection.bias"));

    let t = Translator::load(&out, &Device::Cpu, None).expect("load");
    let srcs = ["Tom is here.", "I don't understand why you are so angry."];
    let res = t.translate(&srcs, &DecodeOptions::default(), None).unwrap();
    for (s, r) in srcs.iter().zip(&res) {
        assert!(r.tokens > 0, "{s:?} -> empty");
        assert!(!r.text.is_empty(), "{s:?} -> {:?}", r.text);
        assert!(
            !r.text.contains(['▁', 'Ġ']) && !r.text.starts_with(' ') && !r.text.contains("  "),
            "{kind:?}: pieces not rejoined: {s:?} -> {:?}",
            r.text
        );
    }
}

#[test]
fn a_tied_bpe_model_trains_exports_and_translates_into_whole_words() {
    train_export_translate(TokenizerKind::Bpe);
}

#[test]
fn a_tied_unigram_model_trains_exports_and_translates_into_whole_words() {
    train_export_translate(TokenizerKind::Unigram);
}
