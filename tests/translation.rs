//! Translation from exported models, on a tiny model trained here until it reproduces its
//! training targets (48 short Tatoeba en-it pairs): f16 export vs the f32 model, checksums,
//! KV-cached decoding vs the uncached reference, beam search vs greedy.

use ampserve::amp::Autocast;
use ampserve::checkpoint;
use ampserve::config::{Precision, TrainSpec};
use ampserve::data::{self, WordTokenizer};
use ampserve::generation::{self as decode, DecodeOptions};
use ampserve::infer::{export, CheckpointChoice, Translator};
use ampserve::model::Transformer;
use ampserve::train::{self, RunOptions};
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

fn data(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/tatoeba-en-it")
        .join(file)
}

/// 48 short training pairs (one batch), every word in the vocabulary (min_frequency 1), no dropout: the
/// model can learn them by heart.
fn memorize_spec() -> TrainSpec {
    let mut s = TrainSpec {
        name: "memorize".into(),
        ..TrainSpec::default()
    };
    s.data.train = data("train.en-it.tsv");
    s.data.valid = Some(data("valid.en-it.tsv"));
    s.data.max_train_pairs = 48;
    s.data.max_len = 14;
    s.data.min_frequency = 1;
    s.model.d_model = 64;
    s.model.layers = 2;
    s.model.heads = 4;
    s.model.d_ff = 128;
    s.model.dropout = 0.0;
    s.train.precision = Precision::Fp32;
    s.train.batch_size = 48;
    s.train.epochs = 1000;
    s.train.max_steps = 300;
    s.train.lr = 3e-3;
    s.train.label_smoothing = 0.0;
    s.train.valid_every = 0;
    s.train.valid_max_sentences = 8;
    s.train.valid_samples = 1;
    s.checkpoint.every_steps = 0;
    s.checkpoint.keep_last = 1;
    s
}

struct Trained {
    run_dir: PathBuf,
    export_dir: PathBuf,
    /// (source words, target words) of the training pairs that fit max_len.
    pairs: Vec<(Vec<u32>, Vec<u32>)>,
    src_tok: WordTokenizer,
}

fn trained() -> &'static Trained {
    static T: OnceLock<Trained> = OnceLock::new();
    T.get_or_init(|| {
        let root = tempfile::tempdir().unwrap().keep();
        let run_dir = root.join("run");
        let spec = memorize_spec();
        let opts = RunOptions {
            out_dir: run_dir.clone(),
            device: Device::Cpu,
            resume: false,
            barrier: None,
        };
        let summary = train::run(&spec, &opts, &mut |_| {}, &AtomicBool::new(false))
            .expect("training failed");
        eprintln!(
            "memorize run: {} steps, final loss {:.4}",
            summary.steps, summary.final_loss
        );
        let export_dir = root.join("model");
        export::export(
            &run_dir,
            CheckpointChoice::Latest,
            &export_dir,
            "memorize",
            None,
        )
        .expect("export failed");
        let prep = train::prepare(&spec, &run_dir).unwrap();
        let strip = |v: &[u32]| v[1..v.len() - 1].to_vec();
        let pairs = prep
            .train
            .iter()
            .map(|e| (strip(&e.src), strip(&e.tgt)))
            .collect();
        Trained {
            run_dir,
            export_dir,
            pairs,
            src_tok: prep.src_tok,
        }
    })
}

/// The f32 master weights of the run's latest checkpoint.
fn f32_model(t: &Trained) -> Transformer {
    let (meta, path) = checkpoint::latest_valid(&t.run_dir.join("checkpoints")).unwrap();
    let m = Transformer::new(&meta.model, 0, &Device::Cpu).unwrap();
    let w = checkpoint::load_tensors(&path, &Device::Cpu).unwrap();
    m.load_named(&|n| w.get(&format!("param.{n}")).cloned())
        .unwrap();
    m
}

fn wrap(words: &[u32]) -> Vec<u32> {
    let mut v = vec![data::SOS_ID];
    v.extend_from_slice(words);
    v.push(data::EOS_ID);
    v
}

#[test]
fn f16_export_reproduces_the_training_targets_like_the_f32_model() {
    let t = trained();
    // checksums verify; the weights are stored f16
    let manifest = export::verify(&t.export_dir).expect("checksums");
    assert_eq!(manifest.dtype, "f16");
    let w = candle_core::safetensors::load(t.export_dir.join("model.safetensors"), &Device::Cpu)
        .unwrap();
    assert!(w.values().all(|x| x.dtype() == candle_core::DType::F16));
    assert_eq!(
        w.values().map(|x| x.elem_count()).sum::<usize>(),
        manifest.params
    );

    let opts = DecodeOptions::default();
    let srcs: Vec<Vec<u32>> = t.pairs.iter().map(|(s, _)| s.clone()).collect();
    let exported = Translator::load(&t.export_dir, &Device::Cpu, None).unwrap();
    let from_f16 = exported.translate_ids(&srcs, &opts, None).unwrap();
    let m32 = f32_model(t);
    let ac = Autocast::new(Precision::Fp32);
    let wrapped: Vec<Vec<u32>> = srcs.iter().map(|s| wrap(s)).collect();
    let limits: Vec<usize> = srcs
        .iter()
        .map(|s| decode::default_max_len(s.len()))
        .collect();
    let from_f32 = decode::greedy(&m32, &ac, &wrapped, &limits, &opts).unwrap();

    // Tatoeba repeats some sources with different translations; only a source with one
    // target has a single right answer
    let unique: Vec<usize> = (0..t.pairs.len())
        .filter(|&i| t.pairs.iter().filter(|p| p.0 == t.pairs[i].0).count() == 1)
        .collect();
    let n = unique.len() as f64;
    let agree = unique
        .iter()
        .filter(|&&i| from_f16[i].tokens == from_f32[i].tokens)
        .count() as f64
        / n;
    let learned = unique
        .iter()
        .filter(|&&i| from_f32[i].tokens == t.pairs[i].1)
        .count() as f64
        / n;
    for &i in &unique {
        if from_f32[i].tokens != t.pairs[i].1 || from_f16[i].tokens != from_f32[i].tokens {
            eprintln!(
                "pair {i}: target {:?}, f32 {:?}, f16 {:?}",
                t.pairs[i].1, from_f32[i].tokens, from_f16[i].tokens
            );
        }
    }
    eprintln!(
        "{} pairs ({} with a unique source): the f32 model reproduces {:.1}% of their targets; \
         the f16 export agrees with f32 on {:.1}%",
        t.pairs.len(),
        unique.len(),
        learned * 100.0,
        agree * 100.0
    );
    assert!(unique.len() >= 20, "{} unique sources", unique.len());
    assert!(
        learned >= 0.9,
        "the model did not learn its targets: {learned}"
    );
    assert!(agree >= 0.95, "f16 export agrees on only {agree}");

    // a corrupted file is refused
    let copy = t.run_dir.parent().unwrap().join("model-corrupt");
    std::fs::create_dir_all(&copy).unwrap();
    for e in std::fs::read_dir(&t.export_dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    let mut bytes = std::fs::read(copy.join("tgt_tokenizer.json")).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 1;
    std::fs::write(copy.join("tgt_tokenizer.json"), bytes).unwrap();
    let err = Translator::load(&copy, &Device::Cpu, None)
        .err()
        .expect("a corrupt model must not load");
    assert!(err.to_string().contains("sha256"), "{err}");
}

#[test]
fn kv_cached_greedy_matches_the_uncached_reference_alone_and_batched() {
    let t = trained();
    let m = f32_model(t);
    let ac = Autocast::new(Precision::Fp32);
    let opts = DecodeOptions::default();
    // training sources plus unseen text (so the outputs are not all memorized targets)
    let mut srcs: Vec<Vec<u32>> = t.pairs.iter().take(12).map(|(s, _)| wrap(s)).collect();
    for line in [
        "Tom is reading a book in the garden.",
        "Where is the station?",
        "I like it.",
    ] {
        srcs.push(wrap(&t.src_tok.encode(line)));
    }
    let limits: Vec<usize> = srcs.iter().map(|s| s.len() + 8).collect();
    let batched = decode::greedy(&m, &ac, &srcs, &limits, &opts).unwrap();
    for (i, s) in srcs.iter().enumerate() {
        let reference = decode::greedy_uncached(&m, &ac, s, limits[i], &opts).unwrap();
        let alone = decode::greedy(&m, &ac, std::slice::from_ref(s), &limits[i..=i], &opts)
            .unwrap()
            .remove(0);
        assert_eq!(
            alone.tokens, reference.tokens,
            "sentence {i}: cached vs uncached"
        );
        assert_eq!(batched[i].tokens, reference.tokens, "sentence {i}: batched");
        assert!((alone.score - reference.score).abs() < 1e-3);
        assert!(!reference.tokens.contains(&data::UNK_ID));
    }
}

#[test]
fn beam_one_is_greedy_and_wider_beams_never_score_below_greedy() {
    let t = trained();
    let m = f32_model(t);
    let ac = Autocast::new(Precision::Fp32);
    let mut srcs: Vec<Vec<u32>> = t.pairs.iter().take(8).map(|(s, _)| wrap(s)).collect();
    let test = ampserve::data::read_tsv(&data("test.en-it.tsv")).unwrap();
    for p in test.pairs.iter().take(16) {
        srcs.push(wrap(&t.src_tok.encode(&p.src)));
    }
    let limits: Vec<usize> = srcs.iter().map(|s| s.len() + 8).collect();
    let raw = |beam| DecodeOptions {
        beam_size: beam,
        alpha: 0.0,
        ..DecodeOptions::default()
    };
    let greedy = decode::greedy(&m, &ac, &srcs, &limits, &raw(1)).unwrap();
    let beam1 = decode::beam_search(&m, &ac, &srcs, &limits, &raw(1)).unwrap();
    for (g, b) in greedy.iter().zip(&beam1) {
        assert_eq!(g.tokens, b.tokens);
        assert!((g.score - b.score).abs() < 1e-4);
    }
    for k in [2, 4, 8] {
        let beam = decode::beam_search(&m, &ac, &srcs, &limits, &raw(k)).unwrap();
        let mut better = 0;
        for (i, (g, b)) in greedy.iter().zip(&beam).enumerate() {
            assert!(
                b.score >= g.score - 1e-4,
                "beam {k}, sentence {i}: {} < greedy {}",
                b.score,
                g.score
            );
            better += (b.score > g.score + 1e-4) as usize;
        }
        eprintln!(
            "beam {k}: higher model score than greedy on {better}/{} sentences",
            srcs.len()
        );
    }
    // length normalisation and the batch: one sentence alone gives the batched answer
    let opts = DecodeOptions {
        beam_size: 4,
        ..DecodeOptions::default()
    };
    let batched = decode::beam_search(&m, &ac, &srcs, &limits, &opts).unwrap();
    for i in [0, 9, 20] {
        let alone = decode::beam_search(&m, &ac, &srcs[i..=i], &limits[i..=i], &opts).unwrap();
        assert_eq!(alone[0].tokens, batched[i].tokens, "sentence {i}");
    }
}
