//! Pretrained MarianMT serving and sampling: each test writes a tiny Marian checkpoint itself
//! (candle-transformers' config, seeded random weights under the tensor names its `marian`
//! module loads, WordLevel `tokenizer.json` files over words of the bundled Tatoeba corpus),
//! imports it into a test server's data directory and drives the real HTTP API.

mod common;

use ampserve::infer::{InferError, MarianImport};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::marian::{Config, MTModel};
use common::{args_for, FakeTrainer, TestServer};
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const D: usize = 16;
const FFN: usize = 32;
const EOS: u32 = 0;
const UNK: u32 = 1;

/// Words of the first `n` pairs of the bundled corpus: (english, italian), each sorted.
fn corpus_words(n: usize) -> (Vec<String>, Vec<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tatoeba-en-it/train.en-it.tsv");
    let text = std::fs::read_to_string(path).unwrap();
    let mut en = std::collections::BTreeSet::new();
    let mut it = std::collections::BTreeSet::new();
    for line in text.lines().take(n) {
        let (s, t) = line.split_once('\t').unwrap();
        for (side, set) in [(s, &mut en), (t, &mut it)] {
            for w in side.split(|c: char| !c.is_alphanumeric()) {
                if !w.is_empty() {
                    set.insert(w.to_string());
                }
            }
        }
    }
    (en.into_iter().collect(), it.into_iter().collect())
}

/// A WordLevel tokenizer.json over `words` (ids given), with `</s>`, `<unk>`, `<pad>`.
fn tokenizer_json(words: &[(String, u32)], pad: u32) -> Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("</s>".into(), json!(EOS));
    vocab.insert("<unk>".into(), json!(UNK));
    vocab.insert("<pad>".into(), json!(pad));
    for (w, id) in words {
        vocab.insert(w.clone(), json!(id));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(EOS, "</s>"), special(UNK, "<unk>"), special(pad, "<pad>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// Writes the checkpoint into `dir`: `config.json`, `model.safetensors`,
/// `src_tokenizer.json` (English words) and `tgt_tokenizer.json` (Italian words) over one id
/// space, as OPUS-MT models share one vocabulary.
fn write_checkpoint(dir: &Path) -> Config {
    std::fs::create_dir_all(dir).unwrap();
    let (en, it) = corpus_words(40);
    let mut next = 2u32;
    let mut ids = |ws: &[String]| {
        ws.iter()
            .map(|w| {
                next += 1;
                (w.clone(), next - 1)
            })
            .collect::<Vec<_>>()
    };
    let en_ids = ids(&en);
    let it_ids = ids(&it);
    let pad = next;
    let vocab = next as usize + 1;
    let cfg = json!({
        "vocab_size": vocab, "decoder_vocab_size": vocab, "max_position_embeddings": 64,
        "encoder_layers": 1, "encoder_ffn_dim": FFN, "encoder_attention_heads": 2,
        "decoder_layers": 1, "decoder_ffn_dim": FFN, "decoder_attention_heads": 2,
        "use_cache": true, "is_encoder_decoder": true, "activation_function": "swish",
        "d_model": D, "decoder_start_token_id": pad, "scale_embedding": true,
        "pad_token_id": pad, "eos_token_id": EOS, "forced_eos_token_id": EOS,
        "share_encoder_decoder_embeddings": true
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(
        dir.join("src_tokenizer.json"),
        tokenizer_json(&en_ids, pad).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tgt_tokenizer.json"),
        tokenizer_json(&it_ids, pad).to_string(),
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let mut t = HashMap::new();
    let mut rand_t = |shape: &[usize], scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| offset + scale * rng.gen_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    // English ids never leave the decoder as Italian words, and `</s>` comes late.
    let mut bias = vec![0f32; vocab];
    bias[EOS as usize] = -1.5;
    for (_, id) in &en_ids {
        bias[*id as usize] = -4.0;
    }
    t.insert(
        "final_logits_bias".to_string(),
        Tensor::from_vec(bias, (1, vocab), &Device::Cpu).unwrap(),
    );
    t.insert("model.shared.weight".into(), rand_t(&[vocab, D], 0.5, 0.0));
    let mut layer = |prefix: &str, attns: &[&str]| {
        let mut put = |name: String, shape: &[usize], scale: f32, offset: f32| {
            t.insert(format!("{prefix}.{name}"), rand_t(shape, scale, offset));
        };
        for a in attns {
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                put(format!("{a}.{p}.weight"), &[D, D], 0.4, 0.0);
                put(format!("{a}.{p}.bias"), &[D], 0.1, 0.0);
            }
            put(format!("{a}_layer_norm.weight"), &[D], 0.1, 1.0);
            put(format!("{a}_layer_norm.bias"), &[D], 0.1, 0.0);
        }
        put("fc1.weight".into(), &[FFN, D], 0.4, 0.0);
        put("fc1.bias".into(), &[FFN], 0.1, 0.0);
        put("fc2.weight".into(), &[D, FFN], 0.4, 0.0);
        put("fc2.bias".into(), &[D], 0.1, 0.0);
        put("final_layer_norm.weight".into(), &[D], 0.1, 1.0);
        put("final_layer_norm.bias".into(), &[D], 0.1, 0.0);
    };
    layer("model.encoder.layers.0", &["self_attn"]);
    layer("model.decoder.layers.0", &["self_attn", "encoder_attn"]);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    serde_json::from_value(cfg).unwrap()
}

/// candle's `marian-mt` example, run straight on the checkpoint's files: source ids + `</s>`,
/// encoder once, greedy decoder steps from the start token with the KV cache (the pad id
/// banned, as OPUS-MT's generation config does). Returns the decoded text and token count.
fn direct_greedy(dir: &Path, cfg: &Config, text: &str, max_len: usize) -> (String, usize) {
    let src_tok = tokenizers::Tokenizer::from_file(dir.join("src_tokenizer.json")).unwrap();
    let tgt_tok = tokenizers::Tokenizer::from_file(dir.join("tgt_tokenizer.json")).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let mut model = MTModel::new(cfg, vb).unwrap();
    let mut tokens = src_tok.encode(text, true).unwrap().get_ids().to_vec();
    tokens.push(cfg.eos_token_id);
    let tokens = Tensor::new(tokens.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let encoder_xs = model.encoder().forward(&tokens, 0).unwrap();
    let mut ban = vec![0f32; cfg.vocab_size];
    ban[cfg.pad_token_id as usize] = f32::NEG_INFINITY;
    let ban = Tensor::new(ban.as_slice(), &Device::Cpu).unwrap();
    let mut lp = LogitsProcessor::from_sampling(0, Sampling::ArgMax);
    let mut token_ids = vec![cfg.decoder_start_token_id];
    for index in 0..max_len {
        let context_size = if index >= 1 { 1 } else { token_ids.len() };
        let start_pos = token_ids.len().saturating_sub(context_size);
        let input_ids = Tensor::new(&token_ids[start_pos..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.decode(&input_ids, &encoder_xs, start_pos).unwrap();
        let logits = logits.squeeze(0).unwrap();
        let logits = logits.get(logits.dim(0).unwrap() - 1).unwrap();
        let token = lp.sample(&(logits + &ban).unwrap()).unwrap();
        if token == cfg.eos_token_id || token == cfg.forced_eos_token_id {
            break;
        }
        token_ids.push(token);
    }
    let out = &token_ids[1..];
    (tgt_tok.decode(out, true).unwrap(), out.len())
}

fn request(dir: &Path, name: &str) -> MarianImport {
    MarianImport {
        dir: dir.to_path_buf(),
        name: name.into(),
        src_lang: "en".into(),
        tgt_lang: "it".into(),
        src_tokenizer: None,
        tgt_tokenizer: None,
    }
}

/// A server with the tiny checkpoint imported: (server, model id, checkpoint dir, config).
async fn server_with_marian(tmp: &Path) -> (TestServer, i64, PathBuf, Config) {
    let ckpt = tmp.join("opus-mt-tiny-en-it");
    let cfg = write_checkpoint(&ckpt);
    let s = TestServer::start(args_for(&tmp.join("data")), FakeTrainer::new()).await;
    let models = s.app.state.pool.models_dir();
    let row = ampserve::import_marian::import_into(
        &s.app.state.store,
        &models,
        request(&ckpt, "opus-mt-tiny-en-it"),
    )
    .await
    .expect("import");
    (s, row.id, ckpt, cfg)
}

const SENTENCES: [&str; 3] = [
    "We learn English every day.",
    "Mind your own business!",
    "I'll tell you more.",
];

#[tokio::test]
async fn an_imported_marian_model_is_listed_with_its_kind_and_languages() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, id, _, _) = server_with_marian(tmp.path()).await;
    let (st, v) = s.get("/api/models").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let m = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("model {id} not listed: {v}"));
    assert_eq!(m["kind"], "marian", "{m}");
    assert_eq!(m["name"], "opus-mt-tiny-en-it");
    assert_eq!(
        (m["src_lang"].as_str(), m["tgt_lang"].as_str()),
        (Some("en"), Some("it"))
    );
    assert_eq!(m["job_id"], Value::Null);
    // the copy in the models area is checksummed, file by file
    for f in [
        "config.json",
        "model.safetensors",
        "src_tokenizer.json",
        "tgt_tokenizer.json",
    ] {
        let sum = m["files"][f]["sha256"].as_str().unwrap_or_default();
        let copy = Path::new(m["path"].as_str().unwrap()).join(f);
        assert_eq!(sum, common::sha256_file(&copy), "{f}");
    }
    s.stop().await;
}

#[tokio::test]
async fn translating_with_a_marian_model_matches_a_direct_candle_greedy_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, id, ckpt, cfg) = server_with_marian(tmp.path()).await;
    let (st, v) = s
        .post(
            "/api/translate",
            &json!({"model": id, "texts": SENTENCES, "max_length": 12}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["model_kind"], "marian");
    assert_eq!(v["temperature"], 0.0);
    let mut produced = 0;
    for (i, text) in SENTENCES.iter().enumerate() {
        let (want, n) = direct_greedy(&ckpt, &cfg, text, 12);
        let got = &v["translations"][i];
        assert_eq!(got["text"], want, "sentence {i}: {v}");
        assert_eq!(got["tokens"], n, "sentence {i}: {v}");
        produced += n;
    }
    assert!(
        produced > 0,
        "the tiny model produced nothing to compare: {v}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_marian_model_refuses_beam_search_naming_beam_size() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, id, _, _) = server_with_marian(tmp.path()).await;
    let (st, v) = s
        .post(
            "/api/translate",
            &json!({"model": id, "text": SENTENCES[0], "beam_size": 4}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "beam_size", "{v}");
    s.stop().await;
}

#[tokio::test]
async fn sampling_with_a_fixed_seed_is_reproducible_and_temperature_zero_is_greedy() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, id, _, _) = server_with_marian(tmp.path()).await;
    let translate = |extra: Value| {
        let mut body = json!({"model": id, "texts": SENTENCES, "max_length": 12});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let s = &s;
        async move {
            let (st, v) = s.post("/api/translate", &body).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            v
        }
    };
    let texts = |v: &Value| -> Vec<String> {
        v["translations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["text"].as_str().unwrap().to_string())
            .collect()
    };
    let greedy = texts(&translate(json!({})).await);
    let zero = translate(json!({"temperature": 0.0, "seed": 5})).await;
    assert_eq!(texts(&zero), greedy, "temperature 0 must be greedy");
    assert_eq!(zero.get("seed"), None, "no sampler was used: {zero}");
    let hot = json!({"temperature": 1.5, "top_p": 0.95, "seed": 42});
    let a = translate(hot.clone()).await;
    let b = translate(hot).await;
    assert_eq!(a["seed"], 42);
    assert_eq!(texts(&a), texts(&b), "the same seed must sample the same");
    // over several seeds a hot sampler leaves the greedy path somewhere
    let mut differs = false;
    for seed in 0..8 {
        let v = translate(json!({"temperature": 2.0, "seed": seed})).await;
        differs |= texts(&v) != greedy;
    }
    assert!(
        differs,
        "sampling at temperature 2 never differed from greedy"
    );
    s.stop().await;
}

#[tokio::test]
async fn bad_sampling_values_are_refused_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let s = TestServer::start(args_for(&tmp.path().join("data")), FakeTrainer::new()).await;
    let cases = [
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"temperature": 11.0}), "temperature"),
        (json!({"temperature": 0.7, "beam_size": 4}), "temperature"),
        (json!({"temperature": 0.7, "top_p": 0.0}), "top_p"),
        (json!({"temperature": 0.7, "top_p": 1.5}), "top_p"),
        (json!({"top_p": 0.9}), "top_p"),
        (json!({"temperature": 0.7, "seed": -1}), "seed"),
        (json!({"temperature": "hot"}), "temperature"),
    ];
    for (extra, field) in cases {
        let mut body = json!({"text": "hello"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (st, v) = s.post("/api/translate", &body).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
    }
    let (st, v) = s
        .get("/api/translate?text=hello&temperature=0.5&beam_size=3")
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "temperature", "{v}");
    s.stop().await;
}

#[test]
fn importing_a_directory_without_its_files_names_each_missing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    write_checkpoint(&ckpt);
    std::fs::remove_file(ckpt.join("tgt_tokenizer.json")).unwrap();
    std::fs::remove_file(ckpt.join("model.safetensors")).unwrap();
    let out = tmp.path().join("models/m");
    let err = ampserve::infer::marian::import(&request(&ckpt, "m"), &out).unwrap_err();
    match &err {
        InferError::Missing { files, .. } => {
            assert_eq!(
                files,
                &[
                    "model.safetensors",
                    "tgt_tokenizer.json (or tokenizer.json)"
                ]
            );
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains("ckpt is missing model.safetensors"),
        "{err}"
    );
    assert!(!out.exists(), "nothing may be left behind");
}

#[test]
fn importing_weights_without_a_tensor_the_network_needs_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    write_checkpoint(&ckpt);
    let w = ckpt.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&w, &Device::Cpu).unwrap();
    t.remove("model.decoder.layers.0.fc2.weight");
    candle_core::safetensors::save(&t, &w).unwrap();
    let err = ampserve::infer::marian::import(&request(&ckpt, "m"), &tmp.path().join("m"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("decoder.layers.0.fc2.weight"), "{err}");
}

/// A model trained here (a few real steps on the bundled corpus), exported when its job
/// succeeds: (server, model id).
async fn server_with_trained_model(tmp: &Path) -> (TestServer, i64) {
    let s = TestServer::start(
        args_for(tmp),
        std::sync::Arc::new(ampserve::worker::CandleTrainer),
    )
    .await;
    let job = s
        .submit(&json!({
            "config": "tiny", "name": "sampling",
            "data": {"max_train_pairs": 200},
            "model": {"d_model": 32, "layers": 1, "heads": 2, "d_ff": 64},
            "train": {"batch_size": 16, "max_steps": 6, "epochs": 1000, "warmup_steps": 2,
                      "valid_every": 6, "valid_max_sentences": 4, "valid_samples": 0},
            "checkpoint": {"every_steps": 6, "keep_last": 1}
        }))
        .await;
    s.wait_status(job, "succeeded").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let (_, v) = s.get("/api/models").await;
        if let Some(id) = v["models"][0]["id"].as_i64() {
            return (s, id);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no model was exported"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_an_ampserve_model_is_reproducible_and_temperature_zero_is_its_greedy() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, id) = server_with_trained_model(tmp.path()).await;
    let translate = |extra: Value| {
        let mut body = json!({"model": id, "texts": SENTENCES, "max_length": 10});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let s = &s;
        async move {
            let (st, v) = s.post("/api/translate", &body).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            assert_eq!(v["model_kind"], "ampserve", "{v}");
            v["translations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["text"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let greedy = translate(json!({})).await;
    assert_eq!(translate(json!({"temperature": 0})).await, greedy);
    let hot = json!({"temperature": 1.2, "top_p": 0.9, "seed": 7});
    assert_eq!(translate(hot.clone()).await, translate(hot).await);
    let mut differs = false;
    for seed in 0..8 {
        differs |= translate(json!({"temperature": 2.0, "seed": seed})).await != greedy;
    }
    assert!(
        differs,
        "sampling at temperature 2 never left the greedy path"
    );
    s.stop().await;
}

fn import_args(ckpt: &Path, data_dir: &Path) -> ampserve::import_marian::ImportMarianArgs {
    ampserve::import_marian::ImportMarianArgs {
        dir: ckpt.to_path_buf(),
        name: "opus-mt-tiny-en-it".into(),
        src_lang: "en".into(),
        tgt_lang: "it".into(),
        src_tokenizer: None,
        tgt_tokenizer: None,
        data_dir: data_dir.to_path_buf(),
    }
}

#[test]
fn the_import_command_records_the_model_for_the_next_server_start() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    write_checkpoint(&ckpt);
    let data = tmp.path().join("data");
    ampserve::import_marian::run(import_args(&ckpt, &data)).expect("import");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = TestServer::start(args_for(&data), FakeTrainer::new()).await;
        let (_, v) = s.get("/api/models").await;
        assert_eq!(v["models"][0]["kind"], "marian", "{v}");
        let (st, v) = s
            .post("/api/translate", &json!({"text": SENTENCES[1]}))
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["model_kind"], "marian", "{v}");
        s.stop().await;
    });
}

#[tokio::test]
async fn the_import_command_refuses_while_a_server_holds_the_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    write_checkpoint(&ckpt);
    let data = tmp.path().join("data");
    let s = TestServer::start(args_for(&data), FakeTrainer::new()).await;
    let args = import_args(&ckpt, &data);
    let err = std::thread::spawn(move || ampserve::import_marian::run(args))
        .join()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a server is using the data directory"),
        "{err}"
    );
    let (_, v) = s.get("/api/models").await;
    assert_eq!(v["models"].as_array().map(Vec::len), Some(0), "{v}");
    s.stop().await;
}
