//! The status page and the presets endpoint over real HTTP: the page and its files are served
//! without a token (the API behind them still wants one), with the right types and caching; and
//! `GET /api/configs` resolves each preset exactly as `POST /api/jobs` does.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_and_assets_are_served_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = args_for(dir.path());
    args.api_token = Some("s3cret".into());
    args.protect_reads = true;
    let srv = TestServer::start(args, FakeTrainer::new()).await;

    let r = srv.client.get(srv.url("/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let html = r.text().await.unwrap();
    assert_eq!(html, std::fs::read_to_string("static/index.html").unwrap());
    // The views the page promises.
    for id in [
        "view-jobs",
        "view-job",
        "view-compare",
        "view-new",
        "view-translate",
    ] {
        assert!(html.contains(&format!("id=\"{id}\"")), "missing {id}");
    }

    // The page loads its entry module; every file of static/ (each module the entry imports
    // included) is served byte for byte, with the type module loading needs.
    assert!(html.contains(r#"<script type="module" src="/static/app.js">"#));
    for file in ["app.css", "favicon.svg"] {
        assert!(html.contains(&format!("/static/{file}")), "{file} unused");
    }
    let mut files: Vec<String> = std::fs::read_dir("static")
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.') && !n.ends_with(".html"))
        .collect();
    files.sort();
    for module in ["app.js", "chart.js", "api.js", "live.js", "router.js"] {
        assert!(files.iter().any(|f| f == module), "{module} missing");
    }
    for file in &files {
        let ctype = match file.rsplit_once('.').unwrap().1 {
            "js" => "text/javascript; charset=utf-8",
            "css" => "text/css; charset=utf-8",
            "svg" => "image/svg+xml",
            other => panic!("static/{file}: no expected type for .{other}"),
        };
        let r = srv
            .client
            .get(srv.url(&format!("/static/{file}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{file}");
        assert_eq!(r.headers()["content-type"], ctype, "{file}");
        assert_eq!(r.headers()["cache-control"], "public, max-age=60");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        let body = r.bytes().await.unwrap();
        assert_eq!(
            body.as_ref(),
            std::fs::read(format!("static/{file}")).unwrap(),
            "{file}"
        );
    }

    // Unknown files (and path tricks) are JSON 404s, not files from elsewhere.
    for path in [
        "/static/nope.js",
        "/static/index.html",
        "/static/docs.html",
        "/static/..%2FCargo.toml",
    ] {
        let (s, v) = srv.get(path).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {v}");
        assert_eq!(v["error"]["code"], "not_found", "{path}");
    }

    // The API itself still wants the token.
    let (s, v) = srv.get("/api/configs").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let r = srv
        .client
        .get(srv.url("/api/configs"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_lists_presets_resolved_like_a_job_request() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(args_for(dir.path()), FakeTrainer::held_after(0)).await;

    let (s, v) = srv.get("/api/configs").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let configs = v["configs"].as_array().unwrap();
    let names: Vec<&str> = configs
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["small", "tiny", "tutorial"]);
    let tiny = &configs[1];
    assert!(tiny.get("error").is_none(), "{tiny}");
    let spec = &tiny["spec"];
    assert_eq!(spec["name"], "tiny-en-it");
    assert_eq!(spec["model"]["d_model"], 128);
    // `precision = "auto"`, resolved for this machine's CPU
    assert_eq!(
        spec["train"]["precision"],
        ampserve::config::Precision::auto().as_str()
    );
    assert_eq!(spec["data"]["tokenizer"], "bpe");
    assert_eq!(spec["train"]["batch_size"], 32);
    // Defaults the TOML leaves out are filled in.
    assert_eq!(spec["train"]["optimizer"], "adam");
    let train = spec["data"]["train"].as_str().unwrap();
    assert!(
        train.starts_with('/') && train.ends_with("tatoeba-en-it/train.en-it.tsv"),
        "{train}"
    );
    assert!(
        train.ends_with("data/tatoeba-en-it/train.en-it.tsv"),
        "the bundled sample is the default root: {train}"
    );
    // Multi30k is not bundled: `small` needs `--data-root`, and says which field fails.
    assert!(configs[0]["spec"].is_null(), "{}", configs[0]);
    assert_eq!(configs[0]["error"]["field"], "data.train");

    // The same spec a job submitted with `config: "tiny"` stores.
    let id = srv.submit(&json!({"config": "tiny"})).await;
    assert_eq!(&srv.job(id).await["spec"], spec);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_reports_presets_that_do_not_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let presets = dir.path().join("presets");
    std::fs::create_dir_all(&presets).unwrap();
    std::fs::write(
        presets.join("good.toml"),
        "name = \"g\"\n[model]\nd_model = 64\nlayers = 1\nheads = 4\nd_ff = 128\n",
    )
    .unwrap();
    std::fs::write(
        presets.join("odd-heads.toml"),
        "[model]\nd_model = 128\nheads = 3\n",
    )
    .unwrap();
    std::fs::write(presets.join("typo.toml"), "[train]\nbatch_sise = 8\n").unwrap();
    std::fs::write(
        presets.join("no-corpus.toml"),
        "[data]\ntrain = \"nowhere/missing.tsv\"\n",
    )
    .unwrap();
    std::fs::write(presets.join("notes.txt"), "not a preset").unwrap();
    std::fs::write(presets.join("bad name.toml"), "").unwrap();
    let mut args = args_for(&dir.path().join("data"));
    args.configs_dir = presets;
    let srv = TestServer::start(args, FakeTrainer::new()).await;

    let (s, v) = srv.get("/api/configs").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let by_name = |n: &str| -> Value {
        v["configs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} missing from {v}"))
    };
    let names: Vec<&str> = v["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["good", "no-corpus", "odd-heads", "typo"]);
    assert_eq!(by_name("good")["spec"]["model"]["d_model"], 64);
    for (name, field) in [
        ("odd-heads", "model.heads"),
        ("typo", "train.batch_sise"),
        ("no-corpus", "data.train"),
    ] {
        let c = by_name(name);
        assert_eq!(c["spec"], Value::Null, "{c}");
        assert_eq!(c["error"]["field"], field, "{c}");
        assert!(!c["error"]["message"].as_str().unwrap().is_empty());
    }
    srv.stop().await;
}
