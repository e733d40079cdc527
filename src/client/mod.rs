//! A command-line client for a running `ampserve serve`, so a user drives the server the way
//! they drive local training: `ampserve jobs submit|list|show|watch|cancel|resume|delete`,
//! `ampserve models list`, `ampserve translate --server URL`. It speaks only the HTTP API
//! (docs/API.md); the token comes from `AMPSERVE_API_TOKEN`. `watch` follows the job's SSE
//! stream and draws the same tqdm-style line as `ampserve train`.
//!
//! An app-level module (like `cli`, `app`): it may use tokio and reqwest.

mod commands;
pub mod sse;

pub use commands::{run_jobs, run_models, translate_remote, watch, JobsCmd, ModelsCmd, ServerArgs};

use reqwest::Method;
use serde_json::Value;

/// What a request to the server can end in.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body (`{"error": {code, message, field}}`).
    #[error("{method} {path}: {status} {code}: {message}{}", field.as_ref().map(|f| format!(" (field `{f}`)")).unwrap_or_default())]
    Api {
        method: String,
        path: String,
        status: u16,
        code: String,
        message: String,
        field: Option<String>,
    },
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    #[error("{path}: unexpected response: {message}")]
    Decode { path: String, message: String },
}

/// The server's base URL and token, and one HTTP connection pool.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            http: reqwest::Client::new(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut r = self.request(method.clone(), path);
        if let Some(b) = body {
            r = r.json(b);
        }
        let resp = r.send().await.map_err(|e| ClientError::Transport {
            url: format!("{}{path}", self.base),
            message: e.to_string(),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let err = serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);
        let e = &err["error"];
        Err(ClientError::Api {
            method: method.to_string(),
            path: path.to_string(),
            status,
            code: e["code"].as_str().unwrap_or("http_error").to_string(),
            message: e["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| text.chars().take(200).collect()),
            field: e["field"].as_str().map(str::to_string),
        })
    }

    /// A JSON request; an empty (204) answer is `Null`.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let resp = self.send(method, path, body).await?;
        let text = resp.text().await.map_err(|e| ClientError::Decode {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Decode {
            path: path.to_string(),
            message: format!("not JSON ({e})"),
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.json(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.json(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.json(Method::DELETE, path, None).await
    }

    /// An open SSE stream (status checked; read it with [`sse::SseParser`]).
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        self.send(Method::GET, path, None).await
    }
}
