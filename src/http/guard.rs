//! Checks on who is asking, before any route runs (issue 13, failure 11): a `Host` this server
//! does not answer to (DNS rebinding: a foreign name resolved to 127.0.0.1 lets any web page
//! reach a localhost server) gets 421, an `Origin` from another site gets 403, and a JSON
//! endpoint refuses other content types with 415 (a `text/plain` form POST is a "simple"
//! cross-site request that browsers send without asking).

use super::{ApiError, AppState};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The loopback names a server bound to a loopback address answers to by default.
pub const LOOPBACK_HOSTS: [&str; 4] = ["localhost", "127.0.0.1", "[::1]", "::1"];

/// `host[:port]` split into the host and whether a port was given.
fn host_part(authority: &str) -> &str {
    if let Some(end) = authority.strip_prefix('[').and_then(|r| r.find(']')) {
        return &authority[..end + 2];
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// An allowed entry matches the whole `host:port` or, given without a port, the host alone.
fn host_allowed(authority: &str, allowed: &[String]) -> bool {
    let a = authority.to_ascii_lowercase();
    let h = host_part(&a);
    allowed.iter().any(|e| *e == a || *e == h)
}

/// The authority of an `Origin` header (`scheme://host[:port]`); `None` for `null` or junk.
fn origin_authority(origin: &str) -> Option<&str> {
    let (_, rest) = origin.split_once("://")?;
    let auth = rest.split('/').next()?;
    (!auth.is_empty()).then_some(auth)
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub(super) async fn host_and_origin(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let allowed = state.settings.allowed_hosts.as_deref();
    let host = header_str(req.headers(), header::HOST)
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if let Some(allowed) = allowed {
        match host.as_deref() {
            Some(h) if host_allowed(h, allowed) => {}
            _ => {
                return ApiError::misdirected(
                    "this server does not answer to that Host (see --allowed-hosts)",
                )
                .into_response()
            }
        }
    }
    if let Some(origin) = header_str(req.headers(), header::ORIGIN) {
        let same_site = origin_authority(origin).is_some_and(|o| {
            host.as_deref().is_some_and(|h| o.eq_ignore_ascii_case(h))
                || allowed.is_some_and(|a| host_allowed(o, a))
        });
        if !same_site {
            return ApiError::forbidden_origin("cross-origin requests are not accepted")
                .into_response();
        }
    }
    next.run(req).await
}

/// POST/PUT/PATCH under `/api` (but the corpus upload, which takes raw TSV) must be
/// `application/json` (or `…+json`); a body-less request may omit the type.
pub(super) async fn json_only(req: Request, next: Next) -> Response {
    let m = req.method();
    let writes = *m == Method::POST || *m == Method::PUT || *m == Method::PATCH;
    let path = req.uri().path();
    if !writes || !path.starts_with("/api/") || path == "/api/corpora" {
        return next.run(req).await;
    }
    let h = req.headers();
    let ok = match header_str(h, header::CONTENT_TYPE) {
        Some(ct) => {
            let essence = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            essence == "application/json"
                || (essence.starts_with("application/") && essence.ends_with("+json"))
        }
        None => {
            let empty_length = header_str(h, header::CONTENT_LENGTH)
                .map(|l| l.trim() == "0")
                .unwrap_or(true);
            empty_length && !h.contains_key(header::TRANSFER_ENCODING)
        }
    };
    if ok {
        next.run(req).await
    } else {
        ApiError::unsupported_media_type("expected Content-Type: application/json").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_with_or_without_a_port() {
        let allowed: Vec<String> = LOOPBACK_HOSTS.iter().map(|s| s.to_string()).collect();
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1:1",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "",
        ] {
            assert!(!host_allowed(bad, &allowed), "{bad}");
        }
        let pinned = vec!["api.internal:8443".to_string()];
        assert!(host_allowed("api.internal:8443", &pinned));
        assert!(!host_allowed("api.internal:80", &pinned));
    }

    #[test]
    fn origins_give_their_authority() {
        assert_eq!(
            origin_authority("http://localhost:8080"),
            Some("localhost:8080")
        );
        assert_eq!(origin_authority("null"), None);
        assert_eq!(origin_authority("https://a.example/x"), Some("a.example"));
    }
}
