//! `/api/corpora`: upload a `source<TAB>target` TSV (streamed to disk, size-limited, checked
//! line by line, hashed) into `<data-dir>/corpora` and, with `--artifact-store`, into the store's
//! `corpora/`, and list the uploads. Jobs then name the file in `data.train`; a node that runs
//! such a job without the file fetches it from the store (`worker::sync`).

use super::{ApiError, ApiQuery, ApiResult, AppState};
use crate::store::corpora::NewCorpus;
use crate::store::CorpusRow;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/corpora", post(upload).get(list))
}

const MAX_EXAMPLES: usize = 10;

#[derive(Debug, Deserialize)]
struct UploadQuery {
    name: Option<String>,
    src_lang: Option<String>,
    tgt_lang: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Malformed {
    pub line: u64,
    pub reason: &'static str,
}

/// Line-by-line checker fed with arbitrary chunks.
#[derive(Debug, Default)]
pub struct TsvChecker {
    partial: Vec<u8>,
    line_no: u64,
    pub valid: u64,
    pub malformed: u64,
    pub examples: Vec<Malformed>,
}

impl TsvChecker {
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
            if self.partial.is_empty() {
                self.check_line(&rest[..pos]);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&rest[..pos]);
                self.check_line(&line);
            }
            rest = &rest[pos + 1..];
        }
        self.partial.extend_from_slice(rest);
    }

    pub fn finish(&mut self) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.check_line(&line);
        }
    }

    fn check_line(&mut self, raw: &[u8]) {
        self.line_no += 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(|b| b.is_ascii_whitespace()) {
            return; // blank lines are ignored, as the corpus reader does
        }
        let reason = match std::str::from_utf8(raw) {
            Err(_) => Some("not valid UTF-8"),
            Ok(s) => {
                let mut parts = s.split('\t');
                match (parts.next(), parts.next(), parts.next()) {
                    (_, None, _) => Some("no tab: expected `source<TAB>target`"),
                    (_, _, Some(_)) => Some("more than one tab"),
                    (Some(a), Some(b), None) if a.trim().is_empty() || b.trim().is_empty() => {
                        Some("empty source or target")
                    }
                    _ => None,
                }
            }
        };
        match reason {
            None => self.valid += 1,
            Some(reason) => {
                self.malformed += 1;
                if self.examples.len() < MAX_EXAMPLES {
                    self.examples.push(Malformed {
                        line: self.line_no,
                        reason,
                    });
                }
            }
        }
    }
}

#[derive(Serialize)]
struct UploadReply {
    corpus: CorpusRow,
    /// The first few malformed lines (1-based line numbers); they are skipped in training.
    malformed_examples: Vec<Malformed>,
}

fn check_name(v: Option<String>, field: &str, max: usize) -> ApiResult<String> {
    let v = v.unwrap_or_default();
    let ok = !v.is_empty()
        && v.len() <= max
        && !v.starts_with('.')
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            field,
            format!("required: 1..={max} letters, digits, '-', '_' or '.' (not starting with '.')"),
        ))
    }
}

#[utoipa::path(post, path = "/api/corpora", operation_id = "upload_corpus", tag = "corpora", params(("name" = String, Query, description = "corpus name"), ("src_lang" = String, Query, description = "source language"), ("tgt_lang" = String, Query, description = "target language")), request_body(content = String, content_type = "text/tab-separated-values", description = "one `source<TAB>target` pair a line"), responses((status = 201, description = "stored", body = Object), (status = 422, description = "invalid field (named in `error.field`)", body = crate::http::openapi::ErrorBody), (status = 413, description = "too large", body = crate::http::openapi::ErrorBody)))]
async fn upload(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let name = check_name(q.name, "name", 64)?;
    let src_lang = check_name(q.src_lang, "src_lang", 16)?;
    let tgt_lang = check_name(q.tgt_lang, "tgt_lang", 16)?;
    if state.store.get_corpus(&name).await?.is_some() {
        return Err(ApiError::conflict(format!(
            "a corpus named `{name}` exists"
        )));
    }
    let dir = &state.settings.corpora_dir;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", dir.display())))?;
    let final_path = dir.join(format!("{name}.{src_lang}-{tgt_lang}.tsv"));
    // Unique per request: two uploads of one name never share (and truncate) a temp file.
    let tmp_path = dir.join(crate::tempfiles::unique_name(".upload-", &name));
    let limit = state.settings.max_upload_bytes;

    let result = async {
        let mut file = tokio::fs::File::create(&tmp_path)
            .await
            .map_err(|e| ApiError::internal(format!("cannot write upload: {e}")))?;
        let mut checker = TsvChecker::default();
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                // The body-limit layer reports through the stream too.
                if std::error::Error::source(&e)
                    .is_some_and(|s| s.to_string().contains("length limit"))
                    || e.to_string().contains("length limit")
                {
                    ApiError::too_large(format!("corpus larger than {limit} bytes"))
                } else {
                    ApiError::bad_request(format!("reading the body failed: {e}"))
                }
            })?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(ApiError::too_large(format!(
                    "corpus larger than {limit} bytes"
                )));
            }
            checker.feed(&chunk);
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| ApiError::internal(format!("cannot write upload: {e}")))?;
        }
        checker.finish();
        file.flush()
            .await
            .map_err(|e| ApiError::internal(format!("cannot write upload: {e}")))?;
        file.sync_all()
            .await
            .map_err(|e| ApiError::internal(format!("cannot write upload: {e}")))?;
        if checker.valid == 0 {
            return Err(ApiError::invalid(
                "body",
                format!(
                    "no valid `source<TAB>target` lines ({} malformed)",
                    checker.malformed
                ),
            ));
        }
        Ok((checker, size, hex::encode(hasher.finalize())))
    }
    .await;
    let (checker, size, sha256) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp_path).await;
            return Err(e);
        }
    };
    // A hard link fails atomically when the name is taken (a rename would replace it), so
    // of two concurrent uploads exactly one file wins and the other gets 409.
    let linked = tokio::fs::hard_link(&tmp_path, &final_path).await;
    let _ = tokio::fs::remove_file(&tmp_path).await;
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(ApiError::conflict(format!(
                "a corpus file for `{name}` ({src_lang}-{tgt_lang}) exists already"
            )));
        }
        Err(e) => return Err(ApiError::internal(format!("cannot store upload: {e}"))),
    }
    // In the artifact store before its row exists: a job naming it may run on any node.
    if let Err(e) = state.pool.upload_corpus(&final_path).await {
        let _ = tokio::fs::remove_file(&final_path).await;
        tracing::error!(corpus = %name, "uploading the corpus to the artifact store failed: {e:#}");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "artifact_store_unavailable",
            format!("the artifact store did not take the corpus: {e:#}"),
        ));
    }
    let row = state
        .store
        .insert_corpus(&NewCorpus {
            name: name.clone(),
            src_lang,
            tgt_lang,
            path: final_path.to_string_lossy().into_owned(),
            size_bytes: size as i64,
            lines: checker.valid as i64,
            malformed_lines: checker.malformed as i64,
            sha256,
        })
        .await?;
    let Some(corpus) = row else {
        let _ = tokio::fs::remove_file(&final_path).await;
        return Err(ApiError::conflict(format!(
            "a corpus named `{name}` exists"
        )));
    };
    tracing::info!(corpus = %corpus.name, lines = corpus.lines, malformed = corpus.malformed_lines, "corpus uploaded");
    Ok((
        StatusCode::CREATED,
        Json(UploadReply {
            corpus,
            malformed_examples: checker.examples,
        }),
    ))
}

#[utoipa::path(get, path = "/api/corpora", operation_id = "list_corpora", tag = "corpora", responses((status = 200, description = "uploaded corpora", body = Object)))]
async fn list(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let rows = state.store.list_corpora().await?;
    Ok(Json(serde_json::json!({ "corpora": rows })))
}

/// Before a job's paths are checked: the uploads it names by file name (`data.train`,
/// `data.train_tgt`, `data.valid`) that another node took are fetched into this node's corpora
/// directory from the artifact store. A failure is logged and left to the path check, which
/// answers 422 naming the field.
pub(super) async fn fetch_named_uploads(state: &AppState, body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    for field in ["train", "train_tgt", "valid"] {
        let Some(name) = v["data"][field].as_str() else {
            continue;
        };
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            continue;
        }
        if let Err(e) = state.pool.fetch_uploaded_corpus(name).await {
            tracing::warn!(corpus = name, error = %e, "cannot fetch an uploaded corpus from the artifact store");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker_handles_chunk_boundaries_and_reports_lines() {
        let text = "a b\tc d\nno tab here\n\nx\ty\tz\n \tx\nlast\tline";
        // Every split point gives the same answer.
        for cut in 0..text.len() {
            let mut c = TsvChecker::default();
            c.feed(&text.as_bytes()[..cut]);
            c.feed(&text.as_bytes()[cut..]);
            c.finish();
            assert_eq!((c.valid, c.malformed), (2, 3), "cut at {cut}");
            assert_eq!(
                c.examples.iter().map(|m| m.line).collect::<Vec<_>>(),
                [2, 4, 5]
            );
        }
        let mut c = TsvChecker::default();
        c.feed(b"ok\tfine\r\n\xff\xfe\tbad\n");
        c.finish();
        assert_eq!((c.valid, c.malformed), (1, 1));
        assert_eq!(c.examples[0].reason, "not valid UTF-8");
    }
}
