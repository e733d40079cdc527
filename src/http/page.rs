//! The status page: the files of `static/`, embedded in the binary (so `ampserve serve` works
//! from any directory), served at `/` and `/static/<file>` outside the auth layer. The page asks
//! for the API token itself when the server wants one.
//!
//! For working on the page without rebuilding: with `AMPSERVE_STATIC_DIR=static` set, the same
//! file names are read from that directory on every request (falling back to the embedded copy).

use super::AppState;
use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// Every file of `static/`; `index.html` is served at `/`, the others at `/static/<name>`.
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../../static/index.html"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../static/app.css"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../static/app.js"),
    },
    Asset {
        name: "chart.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../static/chart.js"),
    },
    Asset {
        name: "experiments.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../static/experiments.js"),
    },
    Asset {
        name: "docs.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../static/docs.js"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_str!("../../static/favicon.svg"),
    },
];

/// The page is revalidated on every load; assets may be reused for a minute.
const PAGE_CACHE: &str = "no-cache";
const ASSET_CACHE: &str = "public, max-age=60";
/// Scripts and styles from this server only; no inline scripts.
pub(super) const CSP: &str =
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'self'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/static/{file}", get(asset))
}

pub fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// Environment variable naming a directory to serve the page's files from instead.
pub const STATIC_DIR_ENV: &str = "AMPSERVE_STATIC_DIR";

fn respond(a: &Asset, cache: &'static str) -> Response {
    // Only names from the fixed table reach the file system.
    let from_disk = std::env::var_os(STATIC_DIR_ENV)
        .filter(|d| !d.is_empty())
        .and_then(|d| std::fs::read(std::path::Path::new(&d).join(a.name)).ok());
    let mut resp = match from_disk {
        Some(bytes) => (StatusCode::OK, bytes).into_response(),
        None => (StatusCode::OK, a.body).into_response(),
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[utoipa::path(get, path = "/", operation_id = "status_page", tag = "page", responses((status = 200, description = "status page", content_type = "text/html")))]
async fn index() -> Response {
    let mut resp = respond(
        find("index.html").expect("index.html is embedded"),
        PAGE_CACHE,
    );
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[utoipa::path(get, path = "/static/{file}", operation_id = "static_asset", tag = "page", params(("file" = String, Path, description = "embedded file name")), responses((status = 200, description = "the file"), (status = 404, description = "no such file", body = crate::http::openapi::ErrorBody)))]
async fn asset(Path(file): Path<String>) -> Response {
    match find(&file).filter(|a| a.name != "index.html") {
        Some(a) => respond(a, ASSET_CACHE),
        None => super::ApiError::not_found(format!("no static file `{file}`")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `/static/...` reference in the page names an embedded file.
    #[test]
    fn page_references_only_embedded_assets() {
        let html = find("index.html").unwrap().body;
        let refs: Vec<&str> = html
            .split("/static/")
            .skip(1)
            .map(|rest| rest.split(['"', '?']).next().unwrap())
            .collect();
        assert!(refs.len() >= 4, "{refs:?}");
        for r in refs {
            assert!(find(r).is_some(), "index.html references missing {r}");
        }
    }
}
