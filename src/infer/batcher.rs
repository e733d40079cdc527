//! Dynamic batching: one thread per loaded model owns it (an [`Engine`]); requests wait in a
//! bounded queue; the thread takes the first, then keeps collecting for at most `max_wait` or
//! until the token budget is reached, and decodes what it collected in calls that share
//! decoding options (beam size / alpha, or the same temperature / top-p when sampling) and
//! stay within the budget (source tokens × beam,
//! `max_batch_tokens`): a request larger than the budget is split across calls, never decoded
//! whole, so one request cannot take gigabytes. Requests whose caller has gone are dropped,
//! not decoded. Each request is answered through its own callback. A full queue is refused at
//! once (back-pressure), never grown. When idle after a batch, the thread hands freed memory
//! back to the OS through the hook the binary sets ([`set_release_memory`]).
//!
//! No tokio here: the server passes a callback that completes its own future.

use super::engine::{Engine, SourceEncoder};
use super::export::Manifest;
use super::sampling::Sampling;
use super::translator::Translation;
use super::InferError;
use crate::config::Precision;
use crate::generation::{DecodeOptions, Hypothesis};
use serde::Serialize;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

static RELEASE_MEMORY: OnceLock<fn()> = OnceLock::new();

/// What an idle batcher calls to give freed memory back to the OS. The allocator is the
/// binary's choice (`main.rs` sets mimalloc's collect here for the server), so the library
/// only holds the hook; without one, idling does nothing.
pub fn set_release_memory(f: fn()) {
    let _ = RELEASE_MEMORY.set(f);
}

fn release_memory() {
    if let Some(f) = RELEASE_MEMORY.get() {
        f();
    }
}

#[derive(Debug, Clone)]
pub struct BatcherConfig {
    /// Requests that may wait (beyond the batch being decoded). Full → refused.
    pub queue_capacity: usize,
    /// Budget of one batch: source words times beam size, summed.
    pub max_batch_tokens: usize,
    /// Most sentences decoded together.
    pub max_batch_sentences: usize,
    /// How long the first request of a batch waits for company.
    pub max_wait: Duration,
    /// Idle this long after a batch, the thread gives the decode's freed memory back to the OS
    /// (see [`set_release_memory`]).
    pub idle_release_after: Duration,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            max_batch_tokens: 8192,
            max_batch_sentences: 128,
            max_wait: Duration::from_millis(5),
            idle_release_after: Duration::from_millis(500),
        }
    }
}

/// The answer to one request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub translations: Vec<Translation>,
    /// From submission to the start of its batch's decode.
    pub queue_ms: f64,
    /// Its decode calls, summed.
    pub decode_ms: f64,
    /// Sentences in the largest decode call it took part in (its own and others').
    pub batch_sentences: usize,
    /// Decode calls its sentences were split across (1 unless it exceeded the batch budget).
    pub decode_calls: usize,
}

pub type Reply = Box<dyn FnOnce(Result<Answer, InferError>) + Send>;

/// One request: source word ids (from [`Batcher::encode`]), options, and where to answer.
pub struct Job {
    pub words: Vec<Vec<u32>>,
    pub opts: DecodeOptions,
    /// Sample (temperature / top-p) instead of deterministic decoding; sentence `i` of the
    /// request uses `seed + i`.
    pub sampling: Option<Sampling>,
    pub max_len: Option<usize>,
    /// Set by the caller when it no longer wants the answer (timed out, disconnected): the
    /// request is then dropped, not decoded.
    pub cancelled: Arc<AtomicBool>,
    pub reply: Reply,
}

struct Queued {
    job: Job,
    at: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the model's translation queue is full ({0} waiting); retry shortly")]
    QueueFull(usize),
    #[error("the model's batcher has stopped")]
    Closed,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    sentences: AtomicU64,
    batches: AtomicU64,
    rejected: AtomicU64,
    decode_us: AtomicU64,
    waiting: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct BatcherStats {
    /// Requests answered.
    pub requests: u64,
    pub sentences: u64,
    /// Decode calls (one per batch).
    pub batches: u64,
    /// Requests refused because the queue was full.
    pub rejected: u64,
    pub decode_ms_total: f64,
    /// Requests waiting now.
    pub waiting: u64,
    /// Requests dropped undecoded (or partly decoded) because their caller had gone.
    pub dropped: u64,
}

/// The handle to a model's batching thread. Dropping the last handle stops the thread once
/// the queued requests are answered.
pub struct Batcher {
    tx: SyncSender<Queued>,
    counters: Arc<Counters>,
    capacity: usize,
    pub manifest: Manifest,
    pub compute: Precision,
    src_tok: SourceEncoder,
    max_source_words: usize,
    max_output_tokens: usize,
    resident_bytes: usize,
    max_batch_tokens: usize,
}

impl Batcher {
    /// Start the batching thread of a loaded model of any kind ([`Engine`]).
    pub fn spawn(translator: impl Engine, cfg: BatcherConfig) -> Self {
        Self::spawn_boxed(Box::new(translator), cfg)
    }

    pub fn spawn_boxed(translator: Box<dyn Engine>, cfg: BatcherConfig) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Queued>(cfg.queue_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let me = Self {
            tx,
            counters: counters.clone(),
            capacity: cfg.queue_capacity.max(1),
            manifest: translator.manifest().clone(),
            compute: translator.compute(),
            src_tok: translator.source_encoder(),
            max_source_words: translator.max_source_words(),
            max_output_tokens: translator.max_output_tokens(),
            resident_bytes: translator.resident_bytes(),
            max_batch_tokens: cfg.max_batch_tokens,
        };
        let name = format!("translate-{}", me.manifest.name);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || run(translator, rx, cfg, counters))
            .expect("spawn the batcher thread");
        me
    }

    /// Source word ids of `text` (what [`Job::words`] holds).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.src_tok.encode(text)
    }

    pub fn max_source_words(&self) -> usize {
        self.max_source_words
    }

    pub fn max_output_tokens(&self) -> usize {
        self.max_output_tokens
    }

    pub fn resident_bytes(&self) -> usize {
        self.resident_bytes
    }

    /// The budget of one decode call (source tokens × beam); a single sentence above it cannot
    /// be decoded.
    pub fn max_batch_tokens(&self) -> usize {
        self.max_batch_tokens
    }

    /// Queue a request; refused at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.counters.waiting.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Queued {
            job,
            at: Instant::now(),
        }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.counters.waiting.fetch_sub(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => {
                        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                        Err(SubmitError::QueueFull(self.capacity))
                    }
                    TrySendError::Disconnected(_) => Err(SubmitError::Closed),
                }
            }
        }
    }

    pub fn stats(&self) -> BatcherStats {
        let c = &self.counters;
        BatcherStats {
            requests: c.requests.load(Ordering::Relaxed),
            sentences: c.sentences.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            decode_ms_total: c.decode_us.load(Ordering::Relaxed) as f64 / 1e3,
            waiting: c.waiting.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }
}

/// A sentence's share of the batch budget: its source words plus specials, times the beam.
pub fn sentence_cost(words: usize, beam_size: usize) -> usize {
    (words + 2) * beam_size.max(1)
}

fn cost(job: &Job) -> usize {
    let beam = job.opts.beam_size;
    job.words.iter().map(|w| sentence_cost(w.len(), beam)).sum()
}

/// Requests that can share one decode call.
fn same_kind(a: &DecodeOptions, b: &DecodeOptions) -> bool {
    a.beam_size == b.beam_size
        && a.alpha.to_bits() == b.alpha.to_bits()
        && a.ban_unk == b.ban_unk
        && a.ignore_eos == b.ignore_eos
}

/// Requests that can share one decode call: same options, and both deterministic or both
/// sampled with the same temperature and top-p (seeds are per sentence).
fn same_job_kind(a: &Job, b: &Job) -> bool {
    same_kind(&a.opts, &b.opts) && Sampling::same_shape(a.sampling.as_ref(), b.sampling.as_ref())
}

fn run(
    translator: Box<dyn Engine>,
    rx: mpsc::Receiver<Queued>,
    cfg: BatcherConfig,
    counters: Arc<Counters>,
) {
    // After a batch, wait `idle_release_after` for more work; when none comes, hand the
    // decode's freed memory back to the OS once, then block.
    let mut dirty = false;
    loop {
        let first = if dirty {
            match rx.recv_timeout(cfg.idle_release_after) {
                Ok(q) => q,
                Err(RecvTimeoutError::Timeout) => {
                    release_memory();
                    dirty = false;
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(q) => q,
                Err(_) => break,
            }
        };
        counters.waiting.fetch_sub(1, Ordering::Relaxed);
        let deadline = Instant::now() + cfg.max_wait;
        let mut tokens = cost(&first.job);
        let mut sentences = first.job.words.len();
        let mut group = vec![first];
        while tokens < cfg.max_batch_tokens && sentences < cfg.max_batch_sentences {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(q) => {
                    counters.waiting.fetch_sub(1, Ordering::Relaxed);
                    tokens += cost(&q.job);
                    sentences += q.job.words.len();
                    group.push(q);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // one kind of options at a time, in arrival order of the kinds
        while !group.is_empty() {
            let head = group.remove(0);
            let opts = head.job.opts.clone();
            let (mut batch, rest): (Vec<Queued>, Vec<Queued>) = group
                .into_iter()
                .partition(|q| same_job_kind(&q.job, &head.job));
            batch.insert(0, head);
            group = rest;
            decode_kind(translator.as_ref(), batch, &opts, &cfg, &counters);
        }
        dirty = true;
    }
}

/// Hypotheses gathered for one request across the decode calls its sentences fall into.
struct Pending {
    q: Queued,
    hyps: Vec<Option<Hypothesis>>,
    /// Decode calls it took part in: (ms, sentences in that call).
    calls: Vec<(f64, usize)>,
    started: Option<Instant>,
    failed: Option<String>,
}

/// Decode requests of one kind in calls of at most `max_batch_tokens` (tokens × beam) and
/// `max_batch_sentences`, splitting a request across calls when it is larger than that, and
/// skipping requests whose caller has gone (timed out, disconnected).
fn decode_kind(
    translator: &dyn Engine,
    batch: Vec<Queued>,
    opts: &DecodeOptions,
    cfg: &BatcherConfig,
    counters: &Counters,
) {
    let mut pending: Vec<Pending> = Vec::with_capacity(batch.len());
    for q in batch {
        if q.job.cancelled.load(Ordering::Relaxed) {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            (q.job.reply)(Err(InferError::Cancelled));
            continue;
        }
        let n = q.job.words.len();
        pending.push(Pending {
            q,
            hyps: vec![None; n],
            calls: Vec::new(),
            started: None,
            failed: None,
        });
    }
    // (request, sentence) in arrival order, cut into calls within the budget
    let order: Vec<(usize, usize)> = pending
        .iter()
        .enumerate()
        .flat_map(|(r, p)| (0..p.q.job.words.len()).map(move |i| (r, i)))
        .collect();
    let mut at = 0;
    while at < order.len() {
        let mut chunk = Vec::new();
        let mut tokens = 0;
        while at < order.len() {
            let (r, i) = order[at];
            let p = &pending[r];
            if p.failed.is_some() || p.q.job.cancelled.load(Ordering::Relaxed) {
                at += 1;
                continue;
            }
            let c = sentence_cost(p.q.job.words[i].len(), opts.beam_size);
            if !chunk.is_empty()
                && (tokens + c > cfg.max_batch_tokens || chunk.len() >= cfg.max_batch_sentences)
            {
                break;
            }
            tokens += c;
            chunk.push((r, i));
            at += 1;
        }
        if chunk.is_empty() {
            break;
        }
        decode_chunk(translator, &mut pending, &chunk, opts, counters);
    }
    for p in pending {
        answer(translator, p, counters);
    }
}

fn decode_chunk(
    translator: &dyn Engine,
    pending: &mut [Pending],
    chunk: &[(usize, usize)],
    opts: &DecodeOptions,
    counters: &Counters,
) {
    let start = Instant::now();
    let mut words = Vec::with_capacity(chunk.len());
    let mut limits = Vec::with_capacity(chunk.len());
    let mut sampling = Vec::new();
    for &(r, i) in chunk {
        let job = &pending[r].q.job;
        limits.push(translator.limit(job.words[i].len(), job.max_len));
        words.push(job.words[i].clone());
        if let Some(s) = &job.sampling {
            sampling.push(s.for_sentence(i));
        }
    }
    // a chunk is all sampled or all deterministic (`same_job_kind`)
    let sampling = (sampling.len() == chunk.len()).then_some(sampling.as_slice());
    let result = catch_unwind(AssertUnwindSafe(|| {
        translator.decode_batch(&words, &limits, opts, sampling)
    }))
    .unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Err(InferError::Decode(format!("decoding panicked: {msg}")))
    });
    let decode_ms = start.elapsed().as_secs_f64() * 1e3;
    counters.batches.fetch_add(1, Ordering::Relaxed);
    counters
        .decode_us
        .fetch_add((decode_ms * 1e3) as u64, Ordering::Relaxed);
    let mut seen = Vec::new();
    for &(r, _) in chunk {
        if !seen.contains(&r) {
            seen.push(r);
            let p = &mut pending[r];
            p.started.get_or_insert(start);
            p.calls.push((decode_ms, chunk.len()));
        }
    }
    match result {
        Ok(hyps) => {
            for (&(r, i), h) in chunk.iter().zip(hyps) {
                pending[r].hyps[i] = Some(h);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for &(r, _) in chunk {
                pending[r].failed.get_or_insert_with(|| msg.clone());
            }
        }
    }
}

fn answer(translator: &dyn Engine, p: Pending, counters: &Counters) {
    counters.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(msg) = p.failed {
        (p.q.job.reply)(Err(InferError::Decode(msg)));
        return;
    }
    if p.q.job.cancelled.load(Ordering::Relaxed) || p.hyps.iter().any(Option::is_none) {
        counters.dropped.fetch_add(1, Ordering::Relaxed);
        (p.q.job.reply)(Err(InferError::Cancelled));
        return;
    }
    let translations =
        p.q.job
            .words
            .iter()
            .zip(p.hyps.into_iter().flatten())
            .map(|(w, h)| Translation {
                text: translator.detokenize(&h),
                source_tokens: w.len(),
                tokens: h.tokens.len(),
                score: h.score,
            })
            .collect::<Vec<_>>();
    counters
        .sentences
        .fetch_add(translations.len() as u64, Ordering::Relaxed);
    let started = p.started.unwrap_or_else(Instant::now);
    let answer = Answer {
        translations,
        queue_ms: started.duration_since(p.q.at).as_secs_f64() * 1e3,
        decode_ms: p.calls.iter().map(|c| c.0).sum(),
        batch_sentences: p.calls.iter().map(|c| c.1).max().unwrap_or(0),
        decode_calls: p.calls.len(),
    };
    (p.q.job.reply)(Ok(answer));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::WordTokenizer;
    use crate::infer::export::{Manifest, ModelConfig};
    use crate::infer::Translator;
    use crate::model::{Config, Transformer};
    use candle_core::Device;
    use std::sync::mpsc::channel;

    fn translator() -> Translator {
        let texts = ["a b c d", "a b c", "b c d", "c d a", "d a b"];
        let tok = WordTokenizer::train(texts.iter().copied(), 1).unwrap();
        let cfg = Config {
            src_vocab: tok.vocab_size(),
            tgt_vocab: tok.vocab_size(),
            d_model: 16,
            layers: 1,
            heads: 2,
            d_ff: 32,
            dropout: 0.0,
            tutorial_layer_norm: true,
            norm_eps: 1e-6,
            max_positions: 32,
            tie_embeddings: false,
        };
        let model = Transformer::new(&cfg, 1, &Device::Cpu).unwrap();
        let manifest = Manifest {
            format: crate::infer::export::FORMAT.into(),
            name: "unit".into(),
            job_id: None,
            run_dir: "/nonexistent".into(),
            checkpoint: "latest".into(),
            step: 0,
            epoch: 0,
            checkpoint_sha256: String::new(),
            val_bleu: None,
            src_lang: "x".into(),
            tgt_lang: "y".into(),
            train_precision: "fp32".into(),
            dtype: "f16".into(),
            params: model.num_parameters(),
            created_unix: 0,
            averaged_steps: Vec::new(),
            files: Default::default(),
        };
        let config = ModelConfig {
            model: cfg,
            src_lang: "x".into(),
            tgt_lang: "y".into(),
            train_max_len: 30,
            unk_policy: Default::default(),
        };
        Translator::from_parts(manifest, config, model, Precision::Fp32, tok.clone(), tok)
    }

    /// The batcher thread answers through the reply callback; a reply that blocks keeps the
    /// thread busy, so the queue fills deterministically.
    #[test]
    fn a_full_queue_refuses_and_every_accepted_request_is_answered() {
        let b = Batcher::spawn(
            translator(),
            BatcherConfig {
                queue_capacity: 2,
                max_wait: Duration::from_millis(0),
                ..BatcherConfig::default()
            },
        );
        let (release_tx, release_rx) = channel::<()>();
        let (done_tx, done_rx) = channel::<usize>();
        let job = |n: usize, block: Option<mpsc::Receiver<()>>| {
            let done = done_tx.clone();
            Job {
                words: vec![b.encode("a b c")],
                opts: DecodeOptions::default(),
                sampling: None,
                max_len: Some(4),
                cancelled: Arc::default(),
                reply: Box::new(move |r| {
                    assert!(r.is_ok());
                    if let Some(rx) = block {
                        let _ = rx.recv();
                    }
                    let _ = done.send(n);
                }),
            }
        };
        b.submit(job(0, Some(release_rx))).unwrap();
        // wait until the thread took job 0 (it then blocks in its reply)
        while b.stats().waiting > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        b.submit(job(1, None)).unwrap();
        b.submit(job(2, None)).unwrap();
        match b.submit(job(3, None)) {
            Err(SubmitError::QueueFull(2)) => {}
            other => panic!("expected a full queue, got {:?}", other.err()),
        }
        assert_eq!(b.stats().rejected, 1);
        release_tx.send(()).unwrap();
        let mut answered: Vec<usize> = (0..3)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(120)).unwrap())
            .collect();
        answered.sort();
        assert_eq!(answered, vec![0, 1, 2]);
        let s = b.stats();
        assert_eq!(s.requests, 3);
        assert!(s.batches <= 3);
    }
}
