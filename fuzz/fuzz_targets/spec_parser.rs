//! `POST /api/jobs` bodies and TOML specs: parsing never panics, and whatever parses and
//! validates also serializes back and parses to the same spec.
#![no_main]

use ampserve::config::TrainSpec;
use ampserve::http::spec::parse_job_request;
use ampserve::http::Settings;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

fn settings() -> &'static Settings {
    static S: OnceLock<Settings> = OnceLock::new();
    S.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let data = std::fs::canonicalize(root.join("../shared/data"))
            .unwrap_or_else(|_| std::env::temp_dir());
        Settings {
            data_dir: std::env::temp_dir(),
            corpora_dir: data.clone(),
            data_roots: vec![data],
            configs_dir: root.join("configs"),
            api_token: None,
            protect_reads: false,
            max_json_bytes: 1 << 20,
            max_upload_bytes: 1 << 20,
            request_timeout: Duration::from_secs(1),
            max_job_memory: None,
            allowed_hosts: None,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_job_request(data, settings()) {
        req.spec.validate().expect("an accepted spec validates");
        let json = serde_json::to_string(&req.spec).unwrap();
        let back: TrainSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, req.spec);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(spec) = TrainSpec::from_toml_str(text) {
            let _ = spec.validate();
        }
    }
});
