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
    pub body: &'static [u8],
}

/// Every file of `static/`, listed by build.rs (content type by extension); `index.html` is
/// served at `/`, the other files at `/static/<name>` (HTML pages only at their own routes).
pub const ASSETS: &[Asset] = include!(concat!(env!("OUT_DIR"), "/static_assets.rs"));

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
    // Only names from the embedded table reach the file system.
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
    match find(&file).filter(|a| !a.name.ends_with(".html")) {
        Some(a) => respond(a, ASSET_CACHE),
        None => super::ApiError::not_found(format!("no static file `{file}`")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(name: &str) -> &'static str {
        std::str::from_utf8(
            find(name)
                .unwrap_or_else(|| panic!("{name} is not embedded"))
                .body,
        )
        .unwrap()
    }

    /// The relative imports (`from "./x.js"`, `import "./x.js"`) of one script module.
    fn imports(js: &str) -> Vec<&str> {
        let mut out = Vec::new();
        for marker in ["from \"./", "import \"./"] {
            for rest in js.split(marker).skip(1) {
                out.push(rest.split('"').next().unwrap());
            }
        }
        out
    }

    /// Every `/static/...` reference in the page, and every module any script imports, names an
    /// embedded file (one missing module would stop the whole page).
    #[test]
    fn page_and_its_modules_reference_only_embedded_assets() {
        let html = text("index.html");
        let refs: Vec<&str> = html
            .split("/static/")
            .skip(1)
            .map(|rest| rest.split(['"', '?']).next().unwrap())
            .collect();
        assert!(refs.contains(&"app.js"), "{refs:?}");
        assert!(html.contains(r#"<script type="module" src="/static/app.js">"#));
        for r in &refs {
            assert!(find(r).is_some(), "index.html references missing {r}");
        }
        let mut seen = vec!["app.js"];
        let mut todo = vec!["app.js"];
        while let Some(m) = todo.pop() {
            for i in imports(text(m)) {
                assert!(find(i).is_some(), "{m} imports missing {i}");
                if !seen.contains(&i) {
                    seen.push(i);
                    todo.push(i);
                }
            }
        }
        // The entry reaches every view and the chart module.
        for m in ["chart.js", "api.js", "live.js", "router.js", "view-job.js"] {
            assert!(
                seen.contains(&m),
                "{m} is not reached from app.js: {seen:?}"
            );
        }
    }

    /// build.rs lists the whole folder, with the types module loading needs.
    #[test]
    fn every_file_of_static_is_embedded_with_its_content_type() {
        let on_disk = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/static"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.'))
            .count();
        assert_eq!(ASSETS.len(), on_disk);
        assert_eq!(
            find("view-jobs.js").unwrap().content_type,
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            find("app.css").unwrap().content_type,
            "text/css; charset=utf-8"
        );
        assert_eq!(find("favicon.svg").unwrap().content_type, "image/svg+xml");
    }
}
