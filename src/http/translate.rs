//! `/api/translate`: validate a request into a typed value, queue it on the model's dynamic
//! batcher (loading the model on first use), await the answer. A full queue is a 429 with
//! `Retry-After`, never an unbounded wait.

use super::error::ModelLoadFailure;
use super::models::load_model;
use super::spec::serde_field_error;
use super::{ApiError, ApiQuery, ApiResult, AppState};
use crate::infer::{
    kind_of_manifest, sentence_cost, Answer, Batcher, DecodeOptions, InferError, Job, Sampling,
};
use crate::store::ModelRow;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Most texts in one request.
pub const MAX_TEXTS: usize = 64;
/// Most source words per text (the model's positions may allow fewer).
pub const MAX_SOURCE_WORDS: usize = 256;
pub const MAX_BEAM: usize = 16;
pub const MAX_LENGTH: usize = 512;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/translate", get(translate_get).post(translate_post))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TranslateBody {
    model: Option<i64>,
    text: Option<String>,
    texts: Option<Vec<String>>,
    beam_size: Option<usize>,
    max_length: Option<usize>,
    alpha: Option<f64>,
    /// Sample instead of deterministic decoding: 0 (or absent) = greedy / beam; (0, 10]
    /// = sampled (needs `beam_size` 1).
    temperature: Option<f64>,
    /// Nucleus sampling, (0, 1]; needs `temperature` > 0.
    top_p: Option<f64>,
    /// Seed of the sampler (sentence `i` uses `seed + i`); absent: a random one, echoed in the
    /// answer. Ignored when not sampling.
    seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TranslateQuery {
    model: Option<i64>,
    text: Option<String>,
    beam_size: Option<usize>,
    max_length: Option<usize>,
    alpha: Option<f64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct TranslationView {
    text: String,
    source_tokens: usize,
    tokens: usize,
    score: f64,
}

#[derive(Serialize, utoipa::ToSchema)]
struct Timing {
    queue_ms: f64,
    decode_ms: f64,
    total_ms: f64,
    /// Sentences in the largest decode call this request took part in.
    batch_size: usize,
    /// Decode calls its texts were split across (the batcher's token budget bounds each).
    decode_calls: usize,
}

#[derive(Serialize, utoipa::ToSchema)]
struct TranslateResponse {
    model: i64,
    model_name: String,
    /// `ampserve` (trained here) or `marian` (an imported pretrained checkpoint).
    model_kind: String,
    beam_size: usize,
    alpha: f64,
    /// 0 when decoding was deterministic.
    temperature: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    /// The sampler's seed (only when sampling).
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    translations: Vec<TranslationView>,
    timing: Timing,
}

#[utoipa::path(get, path = "/api/translate", operation_id = "translate_get", tag = "translate", params(("model" = Option<i64>, Query, description = "model id (default: newest)"), ("text" = String, Query, description = "source text"), ("beam_size" = Option<i64>, Query, description = "1..=16"), ("max_length" = Option<i64>, Query, description = "1..=512"), ("alpha" = Option<f64>, Query, description = "0..=2"), ("temperature" = Option<f64>, Query, description = "0 (deterministic) ..= 10; > 0 samples, needs beam_size 1"), ("top_p" = Option<f64>, Query, description = "(0, 1], needs temperature > 0"), ("seed" = Option<u64>, Query, description = "sampler seed")), responses((status = 200, description = "translations", body = TranslateResponse), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody), (status = 422, description = "invalid field (named in `error.field`)", body = crate::http::openapi::ErrorBody), (status = 429, description = "queue full (Retry-After)", body = crate::http::openapi::ErrorBody)))]
async fn translate_get(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<TranslateQuery>,
) -> ApiResult<Json<TranslateResponse>> {
    let req = check(TranslateBody {
        model: q.model,
        text: Some(q.text.unwrap_or_default()),
        texts: None,
        beam_size: q.beam_size,
        max_length: q.max_length,
        alpha: q.alpha,
        temperature: q.temperature,
        top_p: q.top_p,
        seed: q.seed,
    })?;
    translate(state, req).await
}

#[utoipa::path(post, path = "/api/translate", operation_id = "translate_post", tag = "translate", request_body(content = TranslateBody, content_type = "application/json"), responses((status = 200, description = "translations", body = TranslateResponse), (status = 400, description = "malformed JSON", body = crate::http::openapi::ErrorBody), (status = 404, description = "not found", body = crate::http::openapi::ErrorBody), (status = 422, description = "invalid field (named in `error.field`)", body = crate::http::openapi::ErrorBody), (status = 429, description = "queue full (Retry-After)", body = crate::http::openapi::ErrorBody)))]
async fn translate_post(
    State(state): State<AppState>,
    body: Bytes,
) -> ApiResult<Json<TranslateResponse>> {
    translate(state, parse_translate_body(&body)?).await
}

/// A `POST /api/translate` body, parsed and checked against every limit that does not need the
/// model (the fuzz target `translate_request` drives this).
pub fn parse_translate_body(body: &[u8]) -> ApiResult<TranslateRequest> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::malformed_json(
            "empty body: expected a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let req: TranslateBody = match serde_path_to_error::deserialize(&mut de) {
        Ok(r) => r,
        Err(e) if e.inner().is_syntax() || e.inner().is_eof() => {
            return Err(ApiError::malformed_json(format!(
                "malformed JSON: {}",
                e.into_inner()
            )))
        }
        Err(e) => return Err(serde_field_error(e)),
    };
    check(req)
}

/// A request checked against the limits that do not need the model.
#[derive(Debug)]
pub struct TranslateRequest {
    pub model: Option<i64>,
    pub texts: Vec<String>,
    /// Field name of each text for errors (`text` or `texts[i]`).
    pub fields: Vec<String>,
    pub opts: DecodeOptions,
    /// `Some` when the request samples (temperature > 0).
    pub sampling: Option<Sampling>,
    pub max_len: Option<usize>,
}

fn check(req: TranslateBody) -> ApiResult<TranslateRequest> {
    let (texts, fields) = match (req.text, req.texts) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "texts",
                "give either `text` or `texts`, not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "text",
                "missing: give `text` (a sentence) or `texts` (a list)",
            ))
        }
        (Some(t), None) => (vec![t], vec!["text".to_string()]),
        (None, Some(ts)) => {
            if ts.is_empty() {
                return Err(ApiError::invalid("texts", "empty list"));
            }
            if ts.len() > MAX_TEXTS {
                return Err(ApiError::invalid(
                    "texts",
                    format!("{} texts; at most {MAX_TEXTS} per request", ts.len()),
                ));
            }
            let f = (0..ts.len()).map(|i| format!("texts[{i}]")).collect();
            (ts, f)
        }
    };
    for (t, f) in texts.iter().zip(&fields) {
        if t.trim().is_empty() {
            return Err(ApiError::invalid(f.clone(), "empty text"));
        }
    }
    let beam_size = req.beam_size.unwrap_or(1);
    if !(1..=MAX_BEAM).contains(&beam_size) {
        return Err(ApiError::invalid(
            "beam_size",
            format!("{beam_size} is out of range; allowed 1..={MAX_BEAM}"),
        ));
    }
    let alpha = req.alpha.unwrap_or(0.6);
    if !(0.0..=2.0).contains(&alpha) {
        return Err(ApiError::invalid(
            "alpha",
            format!("{alpha} is out of range; allowed 0..=2"),
        ));
    }
    if let Some(m) = req.max_length {
        if !(1..=MAX_LENGTH).contains(&m) {
            return Err(ApiError::invalid(
                "max_length",
                format!("{m} is out of range; allowed 1..={MAX_LENGTH}"),
            ));
        }
    }
    let sampling = check_sampling(req.temperature, req.top_p, req.seed, beam_size)?;
    Ok(TranslateRequest {
        model: req.model,
        sampling,
        texts,
        fields,
        opts: DecodeOptions {
            beam_size,
            alpha,
            ..DecodeOptions::default()
        },
        max_len: req.max_length,
    })
}

/// The sampling fields, checked: `None` for deterministic decoding (temperature 0 or absent).
fn check_sampling(
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    beam_size: usize,
) -> ApiResult<Option<Sampling>> {
    use crate::infer::sampling::MAX_TEMPERATURE;
    let t = temperature.unwrap_or(0.0);
    if !t.is_finite() || !(0.0..=MAX_TEMPERATURE).contains(&t) {
        return Err(ApiError::invalid(
            "temperature",
            format!("{t} is out of range; allowed 0..={MAX_TEMPERATURE} (0 = deterministic)"),
        ));
    }
    if let Some(p) = top_p {
        if !p.is_finite() || p <= 0.0 || p > 1.0 {
            return Err(ApiError::invalid(
                "top_p",
                format!("{p} is out of range; allowed (0, 1]"),
            ));
        }
        if t == 0.0 {
            return Err(ApiError::invalid(
                "top_p",
                "top_p applies to sampling: give a temperature > 0",
            ));
        }
    }
    if t == 0.0 {
        return Ok(None);
    }
    if beam_size > 1 {
        return Err(ApiError::invalid(
            "temperature",
            format!(
                "sampling (temperature > 0) draws one hypothesis per sentence: use beam_size 1, \
                 or temperature 0 for beam search (beam_size {beam_size})"
            ),
        ));
    }
    Ok(Some(Sampling {
        temperature: t,
        top_p,
        seed: seed.unwrap_or_else(rand::random),
    }))
}

async fn pick_model(state: &AppState, id: Option<i64>) -> ApiResult<ModelRow> {
    match id {
        Some(id) => load_model(state, id).await,
        None => state.store.newest_model().await?.ok_or_else(|| {
            ApiError::not_found(
                "no models yet: a job is exported when it succeeds, or POST /api/jobs/{id}/export",
            )
            .with_field("model")
        }),
    }
}

async fn batcher_for(state: &AppState, m: &ModelRow) -> ApiResult<Arc<Batcher>> {
    if let Some(b) = state.models.get(m.id) {
        return Ok(b);
    }
    let cache = state.models.clone();
    let dir = state
        .pool
        .local_model_dir(m)
        .await
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let id = m.id;
    tokio::task::spawn_blocking(move || cache.get_or_load(id, &dir))
        .await
        .map_err(|e| ApiError::internal(format!("model loading task failed: {e}")))?
        .map_err(|e| ApiError::from(ModelLoadFailure(id, e)))
}

async fn translate(state: AppState, c: TranslateRequest) -> ApiResult<Json<TranslateResponse>> {
    let t0 = Instant::now();
    let m = pick_model(&state, c.model).await?;
    let kind = kind_of_manifest(&m.manifest_json);
    if kind == crate::infer::engine::KIND_MARIAN && c.opts.beam_size > 1 {
        return Err(ApiError::invalid(
            "beam_size",
            format!(
                "model {} is a Marian model: it decodes greedily (beam_size 1) or sampled",
                m.id
            ),
        ));
    }
    let batcher = batcher_for(&state, &m).await?;
    let limit = MAX_SOURCE_WORDS.min(batcher.max_source_words());
    let mut words = Vec::with_capacity(c.texts.len());
    for (t, f) in c.texts.iter().zip(&c.fields) {
        let w = batcher.encode(t);
        if w.is_empty() {
            return Err(ApiError::invalid(f.clone(), "no words in the text"));
        }
        if w.len() > limit {
            return Err(ApiError::invalid(
                f.clone(),
                format!(
                    "{} source tokens; this model takes at most {limit}",
                    w.len()
                ),
            ));
        }
        let budget = batcher.max_batch_tokens();
        if sentence_cost(w.len(), c.opts.beam_size) > budget {
            let field = if sentence_cost(w.len(), 1) > budget {
                f.clone()
            } else {
                "beam_size".to_string()
            };
            return Err(ApiError::invalid(
                field,
                format!(
                    "{} source tokens at beam size {} exceed this server's decode budget of \
                     {budget} tokens × beam",
                    w.len(),
                    c.opts.beam_size
                ),
            ));
        }
        words.push(w);
    }
    // When this future is dropped (the request timed out or the client went away) the batcher
    // sees the flag and skips the request.
    let cancelled = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancelled.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<Result<Answer, InferError>>();
    let beam_size = c.opts.beam_size;
    let alpha = c.opts.alpha;
    let sampling = c.sampling;
    batcher.submit(Job {
        words,
        opts: c.opts,
        sampling,
        max_len: c.max_len,
        cancelled,
        reply: Box::new(move |r| {
            let _ = tx.send(r);
        }),
    })?;
    let answer = rx
        .await
        .map_err(|_| ApiError::internal("the batcher dropped the request"))??;
    Ok(Json(TranslateResponse {
        model: m.id,
        model_name: m.name,
        model_kind: kind.to_string(),
        beam_size,
        alpha,
        temperature: sampling.map_or(0.0, |s| s.temperature),
        top_p: sampling.and_then(|s| s.top_p),
        seed: sampling.map(|s| s.seed),
        translations: answer
            .translations
            .into_iter()
            .map(|t| TranslationView {
                text: t.text,
                source_tokens: t.source_tokens,
                tokens: t.tokens,
                score: t.score,
            })
            .collect(),
        timing: Timing {
            queue_ms: answer.queue_ms,
            decode_ms: answer.decode_ms,
            total_ms: t0.elapsed().as_secs_f64() * 1e3,
            batch_size: answer.batch_sentences,
            decode_calls: answer.decode_calls,
        },
    }))
}

/// Sets the flag when dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
