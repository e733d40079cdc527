//! Corpus readers (TSV and line-aligned parallel text files) and the seeded train/valid split.

use super::DataError;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use std::path::Path;

/// One sentence pair (both sides trimmed, never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub src: String,
    pub tgt: String,
}

/// A line that could not be read as a pair; it is skipped, not fatal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// 1-based line number in the file.
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Corpus {
    pub pairs: Vec<Pair>,
    pub malformed: Vec<Malformed>,
    /// SHA-256 (hex) of the file bytes. For a parallel corpus: SHA-256 over the source length
    /// (u64, little endian), the source bytes and the target bytes, so that moving a line break
    /// from one file to the other changes the hash.
    pub content_hash: String,
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError::io("read", path, e))
}

/// Lines of a file as (1-based number, text); `\r` before `\n` is stripped and a UTF-8 BOM at
/// the start is dropped. Invalid UTF-8 is reported per line as `Err(reason)`.
fn lines(bytes: &[u8]) -> Vec<(usize, Result<&str, String>)> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut out = Vec::new();
    if bytes.is_empty() {
        return out;
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw).map_err(|e| format!("invalid UTF-8: {e}"));
        out.push((i + 1, text));
    }
    out
}

/// Read a `source<TAB>target` file. Each line is split on its FIRST tab and both sides are
/// trimmed; a line without a tab, with an empty side, or with invalid UTF-8 is recorded in
/// [`Corpus::malformed`] and skipped; blank lines are skipped silently. A file without a single
/// usable pair is an error.
pub fn read_tsv(path: &Path) -> Result<Corpus, DataError> {
    let bytes = read_bytes(path)?;
    let content_hash = hex::encode(Sha256::digest(&bytes));
    let mut pairs = Vec::new();
    let mut malformed = Vec::new();
    for (line, text) in lines(&bytes) {
        let text = match text {
            Ok(t) => t,
            Err(reason) => {
                malformed.push(Malformed { line, reason });
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        let Some((src, tgt)) = text.split_once('\t') else {
            malformed.push(Malformed {
                line,
                reason: "no tab separating source and target".into(),
            });
            continue;
        };
        let (src, tgt) = (src.trim(), tgt.trim());
        if src.is_empty() || tgt.is_empty() {
            let side = if src.is_empty() { "source" } else { "target" };
            malformed.push(Malformed {
                line,
                reason: format!("empty {side}"),
            });
            continue;
        }
        pairs.push(Pair {
            src: src.to_string(),
            tgt: tgt.to_string(),
        });
    }
    if pairs.is_empty() {
        return Err(DataError::EmptyCorpus {
            path: path.to_path_buf(),
            malformed: malformed.len(),
        });
    }
    Ok(Corpus {
        pairs,
        malformed,
        content_hash,
    })
}

/// Read two line-aligned text files (line `i` of `src` translates to line `i` of `tgt`).
/// Differing line counts are an error naming both counts. A line pair where both sides are blank
/// is skipped silently; one blank side (or invalid UTF-8) is a [`Malformed`] entry.
pub fn read_parallel(src: &Path, tgt: &Path) -> Result<Corpus, DataError> {
    let sb = read_bytes(src)?;
    let tb = read_bytes(tgt)?;
    let mut h = Sha256::new();
    h.update((sb.len() as u64).to_le_bytes());
    h.update(&sb);
    h.update(&tb);
    let content_hash = hex::encode(h.finalize());
    let (sl, tl) = (lines(&sb), lines(&tb));
    if sl.len() != tl.len() {
        return Err(DataError::LineCountMismatch {
            src: src.to_path_buf(),
            src_lines: sl.len(),
            tgt: tgt.to_path_buf(),
            tgt_lines: tl.len(),
        });
    }
    let mut pairs = Vec::new();
    let mut malformed = Vec::new();
    for ((line, s), (_, t)) in sl.into_iter().zip(tl) {
        let (s, t) = match (s, t) {
            (Ok(s), Ok(t)) => (s.trim(), t.trim()),
            (Err(reason), _) => {
                malformed.push(Malformed {
                    line,
                    reason: format!("source: {reason}"),
                });
                continue;
            }
            (_, Err(reason)) => {
                malformed.push(Malformed {
                    line,
                    reason: format!("target: {reason}"),
                });
                continue;
            }
        };
        match (s.is_empty(), t.is_empty()) {
            (true, true) => continue,
            (true, false) | (false, true) => {
                let side = if s.is_empty() { "source" } else { "target" };
                malformed.push(Malformed {
                    line,
                    reason: format!("empty {side}"),
                });
            }
            (false, false) => pairs.push(Pair {
                src: s.to_string(),
                tgt: t.to_string(),
            }),
        }
    }
    if pairs.is_empty() {
        return Err(DataError::EmptyCorpus {
            path: src.to_path_buf(),
            malformed: malformed.len(),
        });
    }
    Ok(Corpus {
        pairs,
        malformed,
        content_hash,
    })
}

/// Read a corpus: a TSV, or (with `tgt`) two line-aligned files.
pub fn read_corpus(path: &Path, tgt: Option<&Path>) -> Result<Corpus, DataError> {
    match tgt {
        Some(t) => read_parallel(path, t),
        None => read_tsv(path),
    }
}

/// Split `pairs` into `(train, valid)` deterministically for `seed`: a seeded shuffle picks
/// `round(valid_fraction * n)` pairs for validation (at least 1 when `valid_fraction > 0` and
/// `n >= 2`, and never all of them). Both parts keep the corpus order.
pub fn split_seeded(pairs: Vec<Pair>, valid_fraction: f64, seed: u64) -> (Vec<Pair>, Vec<Pair>) {
    let n = pairs.len();
    let frac = if valid_fraction.is_finite() {
        valid_fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mut n_valid = (frac * n as f64).round() as usize;
    if frac > 0.0 && n >= 2 {
        n_valid = n_valid.clamp(1, n - 1);
    } else {
        n_valid = n_valid.min(n.saturating_sub(1));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut is_valid = vec![false; n];
    for &i in &order[..n_valid] {
        is_valid[i] = true;
    }
    let (mut train, mut valid) = (Vec::with_capacity(n - n_valid), Vec::with_capacity(n_valid));
    for (p, v) in pairs.into_iter().zip(is_valid) {
        if v {
            valid.push(p);
        } else {
            train.push(p);
        }
    }
    (train, valid)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A corpus bundled in the repository's `data/`.
    pub(crate) fn bundled(rel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(rel)
    }

    /// A corpus from `../shared/data` (not bundled: Multi30k, FLORES), or `None` with a note
    /// on stderr when that folder is not beside the checkout, so the caller skips that part.
    pub(crate) fn shared_or_skip(rel: &str) -> Option<std::path::PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(rel);
        if p.is_file() {
            Some(p)
        } else {
            eprintln!(
                "skipped: {} is not present (only data/ is bundled)",
                p.display()
            );
            None
        }
    }

    #[test]
    fn tsv_reports_malformed_lines_with_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.tsv");
        let mut f = std::fs::File::create(&p).unwrap();
        // 1 ok, 2 no tab, 3 blank, 4 ok with CRLF and extra tab in target, 5 empty target,
        // 6 empty source, 7 whitespace-only line, 8 ok, 9 invalid UTF-8, 10 ok without newline
        f.write_all(b"Hello.\tCiao.\n").unwrap();
        f.write_all(b"no tab here\n").unwrap();
        f.write_all(b"\n").unwrap();
        f.write_all(b"  A b. \t x\ty \r\n").unwrap();
        f.write_all(b"only source\t   \n").unwrap();
        f.write_all(b"\ttarget only\n").unwrap();
        f.write_all(b"   \t \n").unwrap();
        f.write_all(b"Yes.\tS\xC3\xAC.\n").unwrap();
        f.write_all(b"bad \xFF\tbytes\n").unwrap();
        f.write_all(b"Last.\tUltimo.").unwrap();
        drop(f);
        let c = read_tsv(&p).unwrap();
        let got: Vec<(&str, &str)> = c
            .pairs
            .iter()
            .map(|p| (p.src.as_str(), p.tgt.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("Hello.", "Ciao."),
                ("A b.", "x\ty"),
                ("Yes.", "Sì."),
                ("Last.", "Ultimo.")
            ]
        );
        let lines: Vec<usize> = c.malformed.iter().map(|m| m.line).collect();
        assert_eq!(lines, vec![2, 5, 6, 9], "{:?}", c.malformed);
        assert!(c.malformed[0].reason.contains("no tab"));
        assert!(c.malformed[1].reason.contains("empty target"));
        assert!(c.malformed[2].reason.contains("empty source"));
        assert!(c.malformed[3].reason.contains("UTF-8"));
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(c.content_hash, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(c.content_hash.len(), 64);
    }

    #[test]
    fn empty_and_missing_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.tsv");
        std::fs::write(&p, "\n\nno tab\n").unwrap();
        match read_tsv(&p) {
            Err(DataError::EmptyCorpus { malformed, .. }) => assert_eq!(malformed, 1),
            other => panic!("expected EmptyCorpus, got {other:?}"),
        }
        let missing = dir.path().join("missing.tsv");
        let e = read_tsv(&missing).unwrap_err();
        assert!(matches!(e, DataError::Io { .. }));
        assert!(e.to_string().contains("missing.tsv"), "{e}");
    }

    #[test]
    fn real_tatoeba_reads_cleanly() {
        let c = read_tsv(&bundled("tatoeba-en-it/valid.en-it.tsv")).unwrap();
        assert_eq!(c.pairs.len(), 1000);
        assert!(c.malformed.is_empty());
        assert_eq!(c.pairs[0].src, "They absolutely detest each other.");
        assert_eq!(c.pairs[0].tgt, "Si detestano completamente a vicenda.");
    }

    #[test]
    fn parallel_files_align_and_mismatch_names_counts() {
        let src = read_tsv(&bundled("tatoeba-en-it/valid.en-it.tsv")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (sp, tp) = (dir.path().join("v.en"), dir.path().join("v.it"));
        let s: String = src.pairs.iter().map(|p| format!("{}\n", p.src)).collect();
        let t: String = src.pairs.iter().map(|p| format!("{}\n", p.tgt)).collect();
        std::fs::write(&sp, &s).unwrap();
        std::fs::write(&tp, &t).unwrap();
        let par = read_parallel(&sp, &tp).unwrap();
        assert_eq!(par.pairs, src.pairs);
        assert!(par.malformed.is_empty());
        // the hash covers both files
        std::fs::write(&tp, t.replacen("detestano", "odiano", 1)).unwrap();
        assert_ne!(
            read_parallel(&sp, &tp).unwrap().content_hash,
            par.content_hash
        );
        // one line short
        let short: String = src.pairs[1..]
            .iter()
            .map(|p| format!("{}\n", p.tgt))
            .collect();
        std::fs::write(&tp, short).unwrap();
        let e = read_parallel(&sp, &tp).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("1000") && msg.contains("999"), "{msg}");
        assert!(matches!(
            e,
            DataError::LineCountMismatch {
                src_lines: 1000,
                tgt_lines: 999,
                ..
            }
        ));
    }

    #[test]
    fn split_is_seeded_and_complete() {
        let c = read_tsv(&bundled("tatoeba-en-it/valid.en-it.tsv")).unwrap();
        let (t1, v1) = split_seeded(c.pairs.clone(), 0.1, 7);
        let (t2, v2) = split_seeded(c.pairs.clone(), 0.1, 7);
        let (_, v3) = split_seeded(c.pairs.clone(), 0.1, 8);
        assert_eq!((t1.len(), v1.len()), (900, 100));
        assert_eq!(v1, v2);
        assert_eq!(t1, t2);
        assert_ne!(v1, v3);
        let mut all: Vec<_> = t1
            .iter()
            .chain(&v1)
            .cloned()
            .map(|p| (p.src, p.tgt))
            .collect();
        let mut orig: Vec<_> = c.pairs.iter().cloned().map(|p| (p.src, p.tgt)).collect();
        all.sort();
        orig.sort();
        assert_eq!(all, orig);
        // tiny corpora still get one validation pair, and never lose all training pairs
        let two = c.pairs[..2].to_vec();
        let (t, v) = split_seeded(two.clone(), 0.01, 1);
        assert_eq!((t.len(), v.len()), (1, 1));
        let (t, v) = split_seeded(two.clone(), 0.0, 1);
        assert_eq!((t.len(), v.len()), (2, 0));
        let (t, v) = split_seeded(two, 1.0, 1);
        assert_eq!((t.len(), v.len()), (1, 1));
    }
}
