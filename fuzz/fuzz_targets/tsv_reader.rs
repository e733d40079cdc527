//! The corpus readers on arbitrary bytes: `data::read_tsv` never panics, every pair it keeps
//! has two non-empty trimmed sides and no tab in the source, and the admission scan of the same
//! file never panics either.
#![no_main]

use ampserve::config::TrainSpec;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn dir() -> &'static tempfile::TempDir {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| tempfile::tempdir().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let path = dir().path().join("corpus.tsv");
    std::fs::write(&path, data).unwrap();
    if let Ok(c) = ampserve::data::read_tsv(&path) {
        assert!(!c.pairs.is_empty());
        for p in &c.pairs {
            assert!(!p.src.is_empty() && !p.tgt.is_empty());
            assert_eq!(p.src.trim(), p.src);
            assert_eq!(p.tgt.trim(), p.tgt);
            assert!(!p.src.contains('\t'));
        }
    }
    let mut spec = TrainSpec::default();
    spec.data.train = path;
    spec.data.min_frequency = 1;
    let _ = ampserve::memory::scan_corpus(&spec);
});
