//! The training loop proper.

use super::events::*;
use super::overflow::{self, Injector, OverflowRecord, UnderflowRecord};
use super::tensorboard;
use super::{RunOptions, TrainError};
use crate::amp::{Autocast, GradScaler, ScalerConfig, ScalerError, ScalerState};
use crate::checkpoint::{self, CheckpointMeta};
use crate::config::{OnScaleCollapse, Precision, ScheduleCounts, TrainSpec, UnkPolicy};
use crate::data::{self, Example, Pair, WordTokenizer};
use crate::generation::{self as decode, DecodeOptions};
use crate::model::{self, Ctx, Transformer};
use crate::ops;
use crate::optim::{self, Adam, AdamConfig, LrSchedule};
use crate::scores as metrics; // BLEU/chrF/CER/WER; the alias goes when runner.rs is split
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn data_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Data(e.to_string())
}

/// Everything a run needs from its corpus.
pub struct Prepared {
    pub src_tok: WordTokenizer,
    pub tgt_tok: WordTokenizer,
    pub train: Vec<Example>,
    /// Validation pairs that survived encoding, with their raw text for BLEU.
    pub valid: Vec<(Example, Pair)>,
    pub stats: data::EncodeStats,
    pub malformed: usize,
    pub train_pairs: usize,
    /// Tokenizer files, relative to the run directory.
    pub src_tok_file: PathBuf,
    pub tgt_tok_file: PathBuf,
}

pub fn prepare(spec: &TrainSpec, out_dir: &Path) -> Result<Prepared, TrainError> {
    let d = &spec.data;
    let corpus = match &d.train_tgt {
        Some(t) => data::read_parallel(&d.train, t),
        None => data::read_tsv(&d.train),
    }
    .map_err(data_err)?;
    let mut malformed = corpus.malformed.len();
    let mut pairs = corpus.pairs;
    if d.max_train_pairs > 0 {
        pairs.truncate(d.max_train_pairs);
    }
    let (train_pairs, valid_pairs) = match &d.valid {
        Some(v) => {
            let vc = data::read_tsv(v).map_err(data_err)?;
            malformed += vc.malformed.len();
            (pairs, vc.pairs)
        }
        None => data::split_seeded(pairs, d.valid_fraction, spec.train.seed),
    };
    if train_pairs.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no training pairs",
            d.train.display()
        )));
    }
    // Tokenizers are trained on the training split only; the cache key covers the corpus
    // content and every choice that changes the split, plus the language.
    let key = {
        let mut h = Sha256::new();
        h.update(corpus.content_hash.as_bytes());
        h.update(format!(
            "|max={}|valid={:?}|frac={}|seed={}",
            d.max_train_pairs,
            d.valid.is_some(),
            d.valid_fraction,
            if d.valid.is_some() {
                0
            } else {
                spec.train.seed
            }
        ));
        hex::encode(h.finalize())
    };
    let tok_dir = out_dir.join("tokenizers");
    let opts = data::TokenizerOptions::from_spec(d);
    let ((src_tok, src_tok_path), (tgt_tok, tgt_tok_path)) = if d.joint_vocab {
        // one vocabulary for both sides: trained on the source and target sentences together
        let joint = data::load_or_train_tokenizer(
            &tok_dir,
            &format!("joint-{}-{}", d.src_lang, d.tgt_lang),
            &key,
            &opts,
            train_pairs
                .iter()
                .flat_map(|p| [p.src.as_str(), p.tgt.as_str()]),
        )
        .map_err(data_err)?;
        (joint.clone(), joint)
    } else {
        (
            data::load_or_train_tokenizer(
                &tok_dir,
                &d.src_lang,
                &key,
                &opts,
                train_pairs.iter().map(|p| p.src.as_str()),
            )
            .map_err(data_err)?,
            data::load_or_train_tokenizer(
                &tok_dir,
                &d.tgt_lang,
                &key,
                &opts,
                train_pairs.iter().map(|p| p.tgt.as_str()),
            )
            .map_err(data_err)?,
        )
    };
    let (train, stats) = data::encode_pairs(&train_pairs, &src_tok, &tgt_tok, d.max_len, d.on_long);
    if train.is_empty() {
        return Err(TrainError::Data(format!(
            "no training pair fits data.max_len = {} ({} dropped as too long)",
            d.max_len, stats.dropped_long
        )));
    }
    let mut valid = Vec::with_capacity(valid_pairs.len());
    for p in valid_pairs {
        let (mut ex, _) = data::encode_pairs(
            std::slice::from_ref(&p),
            &src_tok,
            &tgt_tok,
            d.max_len,
            d.on_long,
        );
        if let Some(e) = ex.pop() {
            valid.push((e, p));
        }
    }
    let valid = validation_sample(valid, spec.train.valid_max_sentences, spec.train.seed);
    let rel = |p: PathBuf| p.strip_prefix(out_dir).map(Path::to_path_buf).unwrap_or(p);
    Ok(Prepared {
        src_tok_file: rel(src_tok_path),
        tgt_tok_file: rel(tgt_tok_path),
        src_tok,
        tgt_tok,
        train_pairs: train.len(),
        train,
        valid,
        stats,
        malformed,
    })
}

/// `n` = 0: all of `valid`. Otherwise a seeded sample of up to `n` pairs whose sources are all
/// distinct (first occurrence kept), in corpus order: the first lines of a validation file often
/// repeat sources, and a score on repeats overstates what a model does on unseen text.
pub fn validation_sample(valid: Vec<(Example, Pair)>, n: usize, seed: u64) -> Vec<(Example, Pair)> {
    if n == 0 {
        return valid;
    }
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<(Example, Pair)> = valid
        .into_iter()
        .filter(|(_, p)| seen.insert(p.src.clone()))
        .collect();
    if distinct.len() <= n {
        return distinct;
    }
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut idx: Vec<usize> = (0..distinct.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_7a11d));
    let mut keep = vec![false; distinct.len()];
    for &i in &idx[..n] {
        keep[i] = true;
    }
    distinct
        .into_iter()
        .zip(keep)
        .filter_map(|(v, k)| k.then_some(v))
        .collect()
}

/// Result of evaluating a model on a validation set.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub val_loss: f64,
    pub bleu: f64,
    pub chrf: f64,
    pub cer: f64,
    pub wer: f64,
    pub sentences: usize,
    pub hypotheses: Vec<String>,
}

/// Validation loss (token-weighted, no dropout) and greedy-decoded BLEU / chrF / CER / WER on
/// up to `max_sentences` validation pairs (0 = all), `[UNK]` handled as `unk` says.
pub fn evaluate(
    model: &Transformer,
    ac: &Autocast,
    valid: &[(Example, Pair)],
    tgt_tok: &WordTokenizer,
    max_sentences: usize,
    label_smoothing: f64,
    unk: UnkPolicy,
) -> Result<Evaluation, TrainError> {
    let n = if max_sentences == 0 {
        valid.len()
    } else {
        valid.len().min(max_sentences)
    };
    let set = &valid[..n];
    let dev = model.device().clone();
    // batches of similar length
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| set[i].0.src.len());
    let exs: Vec<Example> = set.iter().map(|(e, _)| e.clone()).collect();
    let (mut loss_sum, mut tok_sum) = (0.0f64, 0usize);
    let mut hyps = vec![String::new(); n];
    for chunk in order.chunks(64) {
        let b = data::make_batch(&exs, chunk);
        let db = b.to_device(&dev)?;
        ac.new_step();
        let ctx = Ctx::eval(ac);
        let l = model
            .loss(&ctx, &db.src, &db.tgt_in, &db.tgt_out, label_smoothing)?
            .to_scalar::<f32>()? as f64;
        loss_sum += l * b.n_tgt_tokens as f64;
        tok_sum += b.n_tgt_tokens;
        let max_len: Vec<usize> = chunk
            .iter()
            .map(|&i| decode::default_max_len(exs[i].src.len().saturating_sub(2)))
            .collect();
        let srcs: Vec<Vec<u32>> = chunk.iter().map(|&i| exs[i].src.clone()).collect();
        let opts = DecodeOptions {
            ban_unk: unk == UnkPolicy::Ban,
            ..DecodeOptions::default()
        };
        let out = decode::greedy(model, ac, &srcs, &max_len, &opts)?;
        for (k, &i) in chunk.iter().enumerate() {
            hyps[i] = tgt_tok.decode_with(&out[k].tokens, unk == UnkPolicy::Drop);
        }
    }
    let refs: Vec<String> = set.iter().map(|(_, p)| p.tgt.clone()).collect();
    Ok(Evaluation {
        val_loss: if tok_sum > 0 {
            loss_sum / tok_sum as f64
        } else {
            0.0
        },
        bleu: metrics::corpus_bleu(&hyps, &refs).score,
        chrf: metrics::corpus_chrf(&hyps, &refs),
        cer: metrics::cer(&hyps, &refs),
        wer: metrics::wer(&hyps, &refs),
        sentences: n,
        hypotheses: hyps,
    })
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Keep only the JSONL lines whose `step` is <= `max_step` (a resumed run replaces, not
/// duplicates, what came after its checkpoint).
fn truncate_jsonl(path: &Path, max_step: u64) -> std::io::Result<()> {
    let Ok(f) = fs::File::open(path) else {
        return Ok(());
    };
    let mut kept = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line?;
        let step = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        if matches!(step, Some(s) if s <= max_step) {
            kept.extend_from_slice(line.as_bytes());
            kept.push(b'\n');
        }
    }
    checkpoint::write_atomic(path, &kept)
}

struct Jsonl(fs::File);

impl Jsonl {
    fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ))
    }
    fn write<T: serde::Serialize>(&mut self, v: &T) {
        if let Ok(mut s) = serde_json::to_vec(v) {
            s.push(b'\n');
            let _ = self.0.write_all(&s);
        }
    }
}

struct RunState {
    step: u64,
    epoch: u64,
    batch_pos: u64,
    best_bleu: Option<f64>,
    last_bleu: Option<(u64, f64)>,
    last_ckpt_step: Option<u64>,
    wall_prev: f64,
    tokens_total: f64,
    step_time_total: f64,
    last_loss: f64,
    tokenizers: (PathBuf, PathBuf),
    early_stop: Option<super::early_stop::EarlyStop>,
}

impl RunState {
    /// Back to where a checkpoint was written (on resume and on recovery): the step, the
    /// position in the data, the best BLEU so far.
    fn rewind_to(&mut self, meta: &CheckpointMeta) {
        self.step = meta.step;
        self.epoch = meta.epoch;
        self.batch_pos = meta.batch_pos;
        self.best_bleu = meta.best_bleu;
        self.last_ckpt_step = Some(meta.step);
    }
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    spec: &TrainSpec,
    dir: &Path,
    model: &Transformer,
    stepper: &Stepper,
    st: &mut RunState,
    t0: Instant,
    barrier: Option<&super::Barrier>,
    sink: &mut dyn FnMut(TrainEvent),
) -> Result<(), TrainError> {
    // The rows this checkpoint covers must be durable before the checkpoint exists.
    if let Some(b) = barrier {
        b.wait(st.step).map_err(|e| {
            TrainError::Checkpoint(format!(
                "step {}: the metrics it covers could not be made durable ({e}); not writing it",
                st.step
            ))
        })?;
    }
    let val_bleu = st.last_bleu.filter(|(s, _)| *s == st.step).map(|(_, b)| b);
    let mut meta = CheckpointMeta {
        step: st.step,
        epoch: st.epoch,
        batch_pos: st.batch_pos,
        adam_t: stepper.opt.t,
        scaler: stepper.scaler.state(),
        seed: spec.train.seed,
        spec: spec.clone(),
        model: model.cfg.clone(),
        sha256: String::new(),
        size_bytes: 0,
        val_bleu,
        created_unix: now_unix(),
        best_bleu: st.best_bleu,
        wall_s: st.wall_prev + t0.elapsed().as_secs_f64(),
        tokens_total: st.tokens_total,
        step_time_total_s: st.step_time_total,
        src_tokenizer: Some(st.tokenizers.0.clone()),
        tgt_tokenizer: Some(st.tokenizers.1.clone()),
    };
    let mut tensors: Vec<(String, Tensor)> = model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (format!("param.{n}"), t))
        .collect();
    tensors.extend(stepper.opt.state_tensors());
    let path = checkpoint::write(dir, &mut meta, tensors).map_err(TrainError::Checkpoint)?;
    let removed = checkpoint::retain(dir, spec.checkpoint.keep_last);
    let is_best = checkpoint::best(dir).is_some_and(|(m, _)| m.step == st.step);
    st.last_ckpt_step = Some(st.step);
    sink(TrainEvent::Checkpoint(CheckpointRecord {
        step: st.step,
        epoch: st.epoch,
        path,
        size_bytes: meta.size_bytes,
        sha256: meta.sha256,
        val_bleu,
        is_best,
        removed,
    }));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_validation(
    spec: &TrainSpec,
    model: &Transformer,
    ac: &Autocast,
    prep: &Prepared,
    st: &mut RunState,
    log: &mut Jsonl,
    sink: &mut dyn FnMut(TrainEvent),
) -> Result<bool, TrainError> {
    if prep.valid.is_empty() {
        return Ok(false);
    }
    let ev = evaluate(
        model,
        ac,
        &prep.valid,
        &prep.tgt_tok,
        0, // prepare() already took the validation sample
        spec.train.label_smoothing,
        spec.train.unk_policy,
    )?;
    let samples = (0..spec.train.valid_samples.min(ev.sentences))
        .map(|i| Sample {
            source: prep.valid[i].1.src.clone(),
            reference: prep.valid[i].1.tgt.clone(),
            hypothesis: ev.hypotheses[i].clone(),
        })
        .collect();
    let rec = ValidationRecord {
        step: st.step,
        epoch: st.epoch,
        val_loss: ev.val_loss,
        bleu: ev.bleu,
        chrf: ev.chrf,
        cer: ev.cer,
        wer: ev.wer,
        sentences: ev.sentences as u64,
        samples,
    };
    st.last_bleu = Some((st.step, ev.bleu));
    st.best_bleu = Some(st.best_bleu.map_or(ev.bleu, |b| b.max(ev.bleu)));
    log.write(&rec);
    sink(TrainEvent::Validation(rec));
    // true: early stopping says stop
    Ok(st
        .early_stop
        .as_mut()
        .is_some_and(|e| e.observe(ev.bleu, ev.val_loss)))
}

/// Run (or resume) a training job. `sink` receives every event in order; `cancel` is checked
/// before each step: when set, the run writes a checkpoint and returns a summary with
/// `cancelled = true`.
pub fn run(
    spec: &TrainSpec,
    opts: &RunOptions,
    sink: &mut dyn FnMut(TrainEvent),
    cancel: &AtomicBool,
) -> Result<super::Summary, TrainError> {
    spec.validate()?;
    let t0 = Instant::now();
    let out = &opts.out_dir;
    let ckpt_dir = out.join("checkpoints");
    fs::create_dir_all(&ckpt_dir)?;
    checkpoint::write_atomic(
        &out.join("spec.json"),
        &serde_json::to_vec_pretty(spec).unwrap_or_default(),
    )?;

    let prep = prepare(spec, out)?;
    let mcfg = model::Config::from_spec(
        &spec.model,
        prep.src_tok.vocab_size(),
        prep.tgt_tok.vocab_size(),
        spec.data.max_len,
    );
    let dev: Device = opts.device.clone();
    let model = Transformer::new(&mcfg, spec.train.seed, &dev)?;
    // The settings in force: the job's spec, changed by a recovery (amp.on_scale_collapse);
    // checkpoints record it, and a resume adopts a recovered precision and lr from them.
    let mut cur = spec.clone();
    let mut stepper = Stepper::new(&cur, &model)?;

    let mut st = RunState {
        step: 0,
        epoch: 0,
        batch_pos: 0,
        best_bleu: None,
        last_bleu: None,
        last_ckpt_step: None,
        wall_prev: 0.0,
        tokens_total: 0.0,
        step_time_total: 0.0,
        last_loss: f64::NAN,
        tokenizers: (prep.src_tok_file.clone(), prep.tgt_tok_file.clone()),
        early_stop: spec
            .train
            .early_stopping
            .map(super::early_stop::EarlyStop::new),
    };
    let mut resumed_path = None;
    if opts.resume {
        if let Some((meta, path)) = checkpoint::latest_valid(&ckpt_dir) {
            if meta.model != mcfg {
                return Err(TrainError::Checkpoint(format!(
                    "{} was written for a different model ({:?}); the spec changed the model or data",
                    path.display(),
                    meta.model
                )));
            }
            let tensors = checkpoint::load_tensors(&path, &dev).map_err(TrainError::Checkpoint)?;
            model.load_named(&|n| tensors.get(&format!("param.{n}")).cloned())?;
            if meta.spec.train.precision != cur.train.precision
                || meta.spec.train.lr != cur.train.lr
            {
                // written after a recovery: continue with what the recovery chose
                cur.train.precision = meta.spec.train.precision;
                cur.amp.enabled = meta.spec.amp.enabled;
                cur.train.lr = meta.spec.train.lr;
                stepper = Stepper::new(&cur, &model)?;
            }
            stepper.opt.load_state(meta.adam_t, &tensors)?;
            stepper.scaler.load_state(meta.scaler.clone());
            st.rewind_to(&meta);
            st.wall_prev = meta.wall_s;
            st.tokens_total = meta.tokens_total;
            st.step_time_total = meta.step_time_total_s;
            resumed_path = Some(path);
        }
    }
    let resumed_from = st.step;
    for f in ["metrics.jsonl", "validations.jsonl"] {
        truncate_jsonl(&out.join(f), resumed_from)?;
    }
    let mut mlog = Jsonl::open(&out.join("metrics.jsonl"))?;
    let mut vlog = Jsonl::open(&out.join("validations.jsonl"))?;
    // Every step and validation also goes to a TensorBoard event file in the run directory.
    let skipped_before = tensorboard::skipped_in_metrics(&out.join("metrics.jsonl"));
    let mut tb = tensorboard::EventWriter::create(out, skipped_before)?;
    let mut tb_failed = false;
    let outer = sink;
    let mut tee = |ev: TrainEvent| {
        if !tb_failed {
            if let Err(e) = tb.record(&ev) {
                tb_failed = true;
                tracing::warn!("TensorBoard event file: {e}; no more scalars are written to it");
            }
        }
        outer(ev);
    };
    let sink: &mut dyn FnMut(TrainEvent) = &mut tee;

    let tr = &spec.train;
    let steps_per_epoch =
        data::plan_epoch(&prep.train, tr.batch_size, tr.max_tokens, tr.seed, 0).len() as u64;
    let mut total_steps = steps_per_epoch * tr.epochs as u64;
    if tr.max_steps > 0 {
        total_steps = total_steps.min(tr.max_steps as u64);
    }
    sink(TrainEvent::Started(StartInfo {
        run_dir: out.clone(),
        steps_per_epoch,
        total_steps,
        resumed_from_step: resumed_from,
        src_vocab: mcfg.src_vocab,
        tgt_vocab: mcfg.tgt_vocab,
        train_pairs: prep.train_pairs,
        valid_pairs: prep.valid.len(),
        dropped_long: prep.stats.dropped_long,
        truncated_long: prep.stats.truncated,
        malformed_lines: prep.malformed,
        parameters: model.num_parameters(),
        device: format!("{dev:?}"),
    }));

    // Announce the checkpoint the run resumed from: a crash may have come between writing it
    // and the event that records it (re-recording one is idempotent).
    if let Some(path) = resumed_path {
        let best = checkpoint::best(&ckpt_dir);
        if let Some((meta, _)) = checkpoint::list(&ckpt_dir)
            .into_iter()
            .find(|(_, p)| *p == path)
        {
            sink(TrainEvent::Checkpoint(CheckpointRecord {
                step: meta.step,
                epoch: meta.epoch,
                is_best: best.is_some_and(|(b, _)| b.step == meta.step),
                path,
                size_bytes: meta.size_bytes,
                sha256: meta.sha256,
                val_bleu: meta.val_bleu,
                removed: Vec::new(),
            }));
        }
    }

    let mut cancelled = false;
    let mut stopped_by: Option<String> = None;
    // first step of the current run of skipped steps (None after a clean step)
    let mut streak_start: Option<u64> = None;
    let mut rollbacks = 0u64;
    let out_of_time = |st: &RunState| {
        tr.max_time_s > 0.0 && st.wall_prev + t0.elapsed().as_secs_f64() >= tr.max_time_s
    };
    let max_steps = if tr.max_steps > 0 {
        tr.max_steps as u64
    } else {
        u64::MAX
    };
    'epochs: while (st.epoch as usize) < tr.epochs {
        let plan = data::plan_epoch(&prep.train, tr.batch_size, tr.max_tokens, tr.seed, st.epoch);
        while (st.batch_pos as usize) < plan.len() {
            if st.step >= max_steps {
                break 'epochs;
            }
            if cancel.load(Ordering::Relaxed) {
                cancelled = true;
                break 'epochs;
            }
            if out_of_time(&st) {
                stopped_by = Some("max_time_s".into());
                break 'epochs;
            }
            let ts = Instant::now();
            let batch = data::make_batch(&prep.train, &plan[st.batch_pos as usize]);
            let db = batch.to_device(&dev)?;
            st.step += 1;
            let (out, gave_up) = stepper.step_checked(&model, &db, st.step)?;
            st.batch_pos += 1;
            let secs = ts.elapsed().as_secs_f64();
            st.tokens_total += batch.n_tgt_tokens as f64;
            st.step_time_total += secs;
            st.last_loss = out.loss;
            let rec = StepRecord {
                step: st.step,
                epoch: st.epoch,
                loss: out.loss,
                lr: out.lr,
                loss_scale: out.scale_used,
                found_inf: out.found_inf,
                skipped: out.skipped,
                grad_norm: out.grad_norm,
                tokens_per_s: batch.n_tgt_tokens as f64 / secs.max(1e-9),
                step_ms: secs * 1e3,
            };
            mlog.write(&rec);
            sink(TrainEvent::Step(rec));
            if let Some(mut o) = out.overflow {
                o.epoch = st.epoch;
                sink(TrainEvent::Overflow(o));
            }
            if let Some(u) = out.underflow {
                sink(TrainEvent::Underflow(u));
            }
            streak_start = if out.skipped {
                streak_start.or(Some(st.step))
            } else {
                None
            };
            if let Some(e) = gave_up {
                let began = streak_start.unwrap_or(st.step);
                let rec = recover(
                    &mut cur,
                    &mut stepper,
                    &model,
                    &mut st,
                    &ckpt_dir,
                    began,
                    &mut rollbacks,
                    e,
                )?;
                streak_start = None;
                for f in ["metrics.jsonl", "validations.jsonl"] {
                    truncate_jsonl(&opts.out_dir.join(f), rec.resumed_from_step)?;
                }
                mlog = Jsonl::open(&opts.out_dir.join("metrics.jsonl"))?;
                vlog = Jsonl::open(&opts.out_dir.join("validations.jsonl"))?;
                sink(TrainEvent::Recovery(rec));
                continue 'epochs;
            }
            if tr.valid_every > 0
                && st.step.is_multiple_of(tr.valid_every as u64)
                && run_validation(spec, &model, &stepper.ac, &prep, &mut st, &mut vlog, sink)?
            {
                stopped_by = Some("early_stopping".into());
            }
            if (st.batch_pos as usize) >= plan.len() {
                st.epoch += 1;
                st.batch_pos = 0;
                if st.last_bleu.map(|(s, _)| s) != Some(st.step)
                    && run_validation(spec, &model, &stepper.ac, &prep, &mut st, &mut vlog, sink)?
                {
                    stopped_by = Some("early_stopping".into());
                }
                save_checkpoint(
                    &cur,
                    &ckpt_dir,
                    &model,
                    &stepper,
                    &mut st,
                    t0,
                    opts.barrier.as_ref(),
                    sink,
                )?;
                if stopped_by.is_some() {
                    break 'epochs;
                }
                continue 'epochs;
            }
            if stopped_by.is_some() {
                break 'epochs;
            }
            let every = spec.checkpoint.every_steps as u64;
            if every > 0 && st.step.is_multiple_of(every) {
                save_checkpoint(
                    &cur,
                    &ckpt_dir,
                    &model,
                    &stepper,
                    &mut st,
                    t0,
                    opts.barrier.as_ref(),
                    sink,
                )?;
            }
        }
        // an empty plan (or a resume exactly at an epoch boundary): next epoch
        st.epoch += 1;
        st.batch_pos = 0;
    }
    if st.step > resumed_from && !cancelled && st.last_bleu.map(|(s, _)| s) != Some(st.step) {
        run_validation(spec, &model, &stepper.ac, &prep, &mut st, &mut vlog, sink)?;
    }
    if st.last_ckpt_step != Some(st.step) || st.step == 0 {
        save_checkpoint(
            &cur,
            &ckpt_dir,
            &model,
            &stepper,
            &mut st,
            t0,
            opts.barrier.as_ref(),
            sink,
        )?;
    }
    let best = checkpoint::best(&ckpt_dir);
    let summary = Summary {
        run_dir: out.clone(),
        steps: st.step,
        epochs_completed: st.epoch,
        skipped_steps: stepper.scaler.skipped_total(),
        final_loss: st.last_loss,
        final_loss_scale: stepper.scaler.scale(),
        best_bleu: st.best_bleu,
        best_checkpoint: best.map(|(_, p)| p),
        latest_checkpoint: checkpoint::list(&ckpt_dir).pop().map(|(_, p)| p),
        wall_s: st.wall_prev + t0.elapsed().as_secs_f64(),
        tokens_per_s: if st.step_time_total > 0.0 {
            st.tokens_total / st.step_time_total
        } else {
            0.0
        },
        cancelled,
        stopped_by,
    };
    sink(TrainEvent::Finished(summary.clone()));
    Ok(summary)
}

/// Heal a collapsed loss scale as `amp.on_scale_collapse` says (or fail with the scaler's
/// verdict): reload the newest checkpoint written before the run of skipped steps that began at
/// `streak_start` (the initial weights when there is none), drop the checkpoints after it, and
/// rebuild the stepper in bf16 or with the learning rate halved. The run state is reset to that
/// checkpoint so the loop replays from there.
#[allow(clippy::too_many_arguments)]
fn recover(
    cur: &mut TrainSpec,
    stepper: &mut Stepper,
    model: &Transformer,
    st: &mut RunState,
    ckpt_dir: &Path,
    streak_start: u64,
    rollbacks: &mut u64,
    verdict: ScalerError,
) -> Result<RecoveryRecord, TrainError> {
    let collapsed_at = st.step;
    match cur.amp.on_scale_collapse {
        OnScaleCollapse::Fail => return Err(TrainError::Scaler(verdict.0)),
        OnScaleCollapse::Bf16 => {
            if !stepper.scaler.is_enabled() {
                // nothing left to switch: the scaler is already off
                return Err(TrainError::Scaler(verdict.0));
            }
            cur.train.precision = Precision::Bf16;
            cur.amp.enabled = Some(false);
        }
        OnScaleCollapse::Rollback => {
            if *rollbacks >= cur.amp.max_rollbacks {
                return Err(TrainError::Scaler(format!(
                    "{} (after {} rollbacks with the learning rate halved each time, \
                     amp.max_rollbacks)",
                    verdict.0, rollbacks
                )));
            }
            *rollbacks += 1;
            cur.train.lr /= 2.0;
        }
    }
    let good = checkpoint::list(ckpt_dir)
        .into_iter()
        .rfind(|(m, _)| m.step < streak_start);
    let injector = stepper.injector.take();
    let dev = model.device().clone();
    match &good {
        Some((meta, path)) => {
            let tensors = checkpoint::load_tensors(path, &dev).map_err(TrainError::Checkpoint)?;
            model.load_named(&|n| tensors.get(&format!("param.{n}")).cloned())?;
            *stepper = Stepper::new(cur, model)?;
            stepper.opt.load_state(meta.adam_t, &tensors)?;
            // rollback keeps f16 with the checkpoint's scale; bf16 starts a scaler that is off,
            // but the steps skipped before the checkpoint stay counted
            stepper.scaler.load_state(match cur.amp.on_scale_collapse {
                OnScaleCollapse::Rollback => meta.scaler.clone(),
                _ => ScalerState {
                    skipped_total: meta.scaler.skipped_total,
                    ..stepper.scaler.state()
                },
            });
            st.rewind_to(meta);
        }
        None => {
            let fresh = Transformer::new(&model.cfg, cur.train.seed, &dev)?;
            let named: std::collections::HashMap<String, Tensor> =
                fresh.named_tensors().into_iter().collect();
            model.load_named(&|n| named.get(n).cloned())?;
            *stepper = Stepper::new(cur, model)?;
            st.step = 0;
            st.epoch = 0;
            st.batch_pos = 0;
            st.best_bleu = None;
            st.last_ckpt_step = None;
        }
    }
    stepper.injector = injector;
    st.last_bleu = None;
    let from = st.step;
    for (m, p) in checkpoint::list(ckpt_dir) {
        if m.step > from {
            let _ = fs::remove_file(checkpoint::sidecar_path(&p));
            let _ = fs::remove_file(&p);
        }
    }
    Ok(RecoveryRecord {
        step: collapsed_at,
        action: cur.amp.on_scale_collapse.as_str().to_string(),
        resumed_from_step: from,
        precision: cur.train.precision.as_str().to_string(),
        lr: cur.train.lr,
        rollbacks: *rollbacks,
        reason: verdict.0,
    })
}

/// What one optimizer step did.
#[derive(Debug, Clone)]
pub struct StepOut {
    pub loss: f64,
    pub lr: f64,
    pub scale_used: f64,
    pub found_inf: bool,
    pub skipped: bool,
    pub grad_norm: f64,
    /// On an overflowing step: which gradients (and, when traced, activations) were to blame.
    pub overflow: Option<OverflowRecord>,
    /// On a sampled step (`amp.underflow_every`, scaler on): the gradients' f16 underflow.
    pub underflow: Option<UnderflowRecord>,
}

/// One mixed-precision training step, shared by the trainer and the benchmark: forward under
/// autocast, loss in f32, scaled backward, one global-norm/overflow reduction, unscale + clip
/// fused into the Adam update (or skip), scaler update.
pub struct Stepper {
    pub opt: Adam,
    pub scaler: GradScaler,
    pub sched: LrSchedule,
    pub ac: Autocast,
    pub seed: u64,
    pub dropout: f64,
    pub label_smoothing: f64,
    pub clip: f64,
    pub schedule_counts: ScheduleCounts,
    pub trace_overflow: bool,
    pub underflow_every: u64,
    /// `amp.test_inject_inf` (test only).
    pub injector: Option<Injector>,
}

impl Stepper {
    pub fn new(spec: &TrainSpec, model: &Transformer) -> Result<Self, TrainError> {
        let names: Vec<&str> = model.params.iter().map(|(n, _)| n.as_str()).collect();
        Ok(Self {
            opt: Adam::new(model.params.clone(), AdamConfig::from_spec(&spec.train))?,
            scaler: GradScaler::new(ScalerConfig::from_spec(&spec.amp, spec.scaler_enabled())),
            sched: LrSchedule::from_spec(&spec.train),
            ac: Autocast::new(spec.train.precision),
            seed: spec.train.seed,
            dropout: spec.model.dropout,
            label_smoothing: spec.train.label_smoothing,
            clip: spec.train.clip_grad_norm,
            schedule_counts: spec.train.schedule_counts,
            trace_overflow: spec.amp.trace_overflow,
            underflow_every: spec.amp.underflow_every,
            injector: Injector::new(spec.amp.test_inject_inf.as_ref(), &names)?,
        })
    }

    /// The step the schedule reads for attempted step `step` (1-based): `step` itself, or the
    /// optimizer step this one would apply (skipped steps do not advance it).
    pub fn schedule_step(&self, step: u64) -> u64 {
        match self.schedule_counts {
            ScheduleCounts::AllSteps => step,
            ScheduleCounts::OptimizerSteps => self.opt.t + 1,
        }
    }

    /// `step` is the 1-based step number (it seeds dropout and, with
    /// `train.schedule_counts = "all_steps"`, sets the learning rate). Errors when the scaler
    /// gives up (see [`Self::step_checked`] for the step's record along with that verdict).
    pub fn step(
        &mut self,
        model: &Transformer,
        db: &data::DeviceBatch,
        step: u64,
    ) -> Result<StepOut, TrainError> {
        match self.step_checked(model, db, step)? {
            (out, None) => Ok(out),
            (_, Some(e)) => Err(TrainError::Scaler(e.0)),
        }
    }

    /// [`Self::step`], returning the step's record even when the scaler gave up on this step
    /// (the second value: overflow at `min_scale` for `amp.max_consecutive_skips` steps).
    pub fn step_checked(
        &mut self,
        model: &Transformer,
        db: &data::DeviceBatch,
        step: u64,
    ) -> Result<(StepOut, Option<ScalerError>), TrainError> {
        self.ac.new_step();
        let mut ctx = Ctx::new(&self.ac, true, self.dropout, ops::step_rng(self.seed, step));
        if self.trace_overflow {
            ctx = ctx.with_overflow_trace();
        }
        let loss = model.loss(&ctx, &db.src, &db.tgt_in, &db.tgt_out, self.label_smoothing)?;
        let grads = self.scaler.scale_loss(&loss)?.backward()?;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        let mut glist: Vec<Tensor> = model
            .params
            .iter()
            .map(|(_, v)| match grads.get(v) {
                Some(g) => Ok(g.clone()),
                None => v.zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        drop(grads);
        if self.scaler.is_enabled() {
            if let Some(inj) = self.injector.as_mut() {
                inj.apply(step, &mut glist)?;
            }
        }
        let ss = optim::sum_squares(&glist)?;
        let found_inf = GradScaler::found_inf(ss) || !loss_v.is_finite();
        let scale = self.scaler.scale();
        let grad_norm = ss.sqrt() * self.scaler.inv_scale();
        let lr = self.sched.lr(self.schedule_step(step));
        let overflow = if found_inf {
            let names: Vec<&str> = model.params.iter().map(|(n, _)| n.as_str()).collect();
            let act = ctx.first_overflow();
            Some(OverflowRecord {
                step,
                epoch: 0,
                loss_scale: scale,
                loss_finite: loss_v.is_finite(),
                tensors: overflow::inspect(&names, &glist)?,
                activation_max: act.as_ref().map(|a| a.1),
                activation: act.map(|a| a.0),
            })
        } else {
            None
        };
        let underflow = if !found_inf
            && self.scaler.is_enabled()
            && self.underflow_every > 0
            && step.is_multiple_of(self.underflow_every)
        {
            Some(overflow::underflow(step, scale, &glist)?)
        } else {
            None
        };
        if !found_inf {
            let coef = optim::clip_coef(grad_norm, self.clip);
            self.opt.step(&glist, lr, self.scaler.inv_scale() * coef)?;
        }
        let (used, skipped, gave_up) = match self.scaler.update(found_inf) {
            Ok(o) => (o.scale_used, o.skipped, None),
            Err(e) => (scale, true, Some(e)),
        };
        Ok((
            StepOut {
                loss: loss_v,
                lr,
                scale_used: used,
                found_inf,
                skipped,
                grad_norm,
                overflow,
                underflow,
            },
            gave_up,
        ))
    }
}
