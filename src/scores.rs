//! Translation scores, kept below both of their users (validation in `train`, test-set
//! evaluation in `infer`) and named apart from the per-step training metrics and Prometheus.
//!
//! Compatible with sacreBLEU 2.x defaults: corpus BLEU (13a tokenizer,
//! 4-gram, exponential smoothing, one reference), chrF2 (character 6-grams, no word n-grams,
//! beta 2, whitespace removed), plus character and word error rates.
//!
//! Agreement with the real sacreBLEU is checked to 1e-6 against a fixture produced by
//! `tests/fixtures/sacrebleu/make_fixture.py`. Every function returns a finite number (never
//! NaN) for any input, including empty lists and empty strings.

use std::collections::HashMap;
use std::hash::Hash;

/// Corpus BLEU with its parts, as sacreBLEU reports them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BleuScore {
    /// 0..=100.
    pub score: f64,
    /// Modified n-gram precisions (percent) for n = 1..=4, after smoothing.
    pub precisions: [f64; 4],
    /// Brevity penalty.
    pub bp: f64,
    /// Hypothesis tokens (after 13a tokenization).
    pub sys_len: usize,
    /// Reference tokens (after 13a tokenization).
    pub ref_len: usize,
}

/// Python's `str.isspace`: Rust's White_Space plus the ASCII separators U+001C..U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split()` (no argument).
fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_space).filter(|w| !w.is_empty())
}

/// The first 13a regex: `([\{-\~\[-\` -\&\(-\+\:-\@\/])` -> ` \1 `.
fn is_13a_symbol(c: char) -> bool {
    matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/')
}

/// `re.sub` for a pattern of two single-character classes: scan left to right, replace each
/// non-overlapping match and continue after it (Python's semantics for fixed-width patterns).
fn sub2(
    chars: &[char],
    first: impl Fn(char) -> bool,
    second: impl Fn(char) -> bool,
    repl: impl Fn(char, char, &mut Vec<char>),
) -> Vec<char> {
    let mut out = Vec::with_capacity(chars.len() + 8);
    let mut i = 0;
    while i < chars.len() {
        if i + 1 < chars.len() && first(chars[i]) && second(chars[i + 1]) {
            repl(chars[i], chars[i + 1], &mut out);
            i += 2;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// sacreBLEU's default "13a" tokenizer (mteval-v13a), exactly: removes `<skipped>`, joins
/// `-\n`, unescapes `&quot; &amp; &lt; &gt;`, splits off most ASCII punctuation and symbols,
/// splits `.`/`,` unless between digits and `-` after a digit, and normalises whitespace.
pub fn tokenize_13a(s: &str) -> String {
    let mut line = s
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut chars = Vec::with_capacity(line.len() + 16);
    chars.push(' ');
    for c in line.chars() {
        if is_13a_symbol(c) {
            chars.extend([' ', c, ' ']);
        } else {
            chars.push(c);
        }
    }
    chars.push(' ');
    let digit = |c: char| c.is_ascii_digit();
    let dot_comma = |c: char| c == '.' || c == ',';
    // ([^0-9])([\.,]) -> \1 \2 (space after)
    let chars = sub2(
        &chars,
        |c| !digit(c),
        dot_comma,
        |a, b, o| o.extend([a, ' ', b, ' ']),
    );
    // ([\.,])([^0-9]) -> ' \1 \2'
    let chars = sub2(
        &chars,
        dot_comma,
        |c| !digit(c),
        |a, b, o| o.extend([' ', a, ' ', b]),
    );
    // ([0-9])(-) -> \1 \2 (space after)
    let chars = sub2(
        &chars,
        digit,
        |c| c == '-',
        |a, b, o| o.extend([a, ' ', b, ' ']),
    );
    let s: String = chars.into_iter().collect();
    py_split(&s).collect::<Vec<_>>().join(" ")
}

fn count<K: Hash + Eq>(items: impl Iterator<Item = K>) -> HashMap<K, usize> {
    let mut m = HashMap::new();
    for k in items {
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

fn check_lengths(hyps: &[String], refs: &[String]) {
    assert_eq!(
        hyps.len(),
        refs.len(),
        "metrics need one reference per hypothesis"
    );
}

/// Corpus-level BLEU with sacreBLEU's defaults (13a tokenization, case-sensitive, n-grams up to 4,
/// "exp" smoothing, one reference per hypothesis, segments right-stripped before tokenizing).
///
/// Panics when `hyps` and `refs` differ in length.
pub fn corpus_bleu(hyps: &[String], refs: &[String]) -> BleuScore {
    check_lengths(hyps, refs);
    const N: usize = 4;
    let mut correct = [0usize; N];
    let mut total = [0usize; N];
    let (mut sys_len, mut ref_len) = (0usize, 0usize);
    for (h, r) in hyps.iter().zip(refs) {
        let ht = tokenize_13a(h.trim_end_matches(py_space));
        let rt = tokenize_13a(r.trim_end_matches(py_space));
        let hw: Vec<&str> = py_split(&ht).collect();
        let rw: Vec<&str> = py_split(&rt).collect();
        sys_len += hw.len();
        ref_len += rw.len();
        for n in 1..=N {
            if hw.len() < n {
                break;
            }
            let hc = count(hw.windows(n));
            let rc = count(rw.windows(n));
            for (g, c) in &hc {
                total[n - 1] += c;
                if let Some(rc) = rc.get(g) {
                    correct[n - 1] += (*c).min(*rc);
                }
            }
        }
    }
    bleu_from_stats(correct, total, sys_len, ref_len)
}

/// sacreBLEU's `BLEU.compute_bleu` with `smooth_method="exp"` and no effective order.
fn bleu_from_stats(
    correct: [usize; 4],
    total: [usize; 4],
    sys_len: usize,
    ref_len: usize,
) -> BleuScore {
    let bp = if sys_len < ref_len {
        if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = [0.0f64; 4];
    if correct.iter().all(|&c| c == 0) {
        return BleuScore {
            score: 0.0,
            precisions,
            bp,
            sys_len,
            ref_len,
        };
    }
    let mut smooth = 1.0f64;
    for n in 0..4 {
        if total[n] == 0 {
            break;
        }
        precisions[n] = if correct[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * total[n] as f64)
        } else {
            100.0 * correct[n] as f64 / total[n] as f64
        };
    }
    // sacreBLEU's my_log: log(0) is floored to -9999999999
    let log_sum: f64 = precisions
        .iter()
        .map(|&p| if p == 0.0 { -9_999_999_999.0 } else { p.ln() })
        .sum();
    BleuScore {
        score: bp * (log_sum / 4.0).exp(),
        precisions,
        bp,
        sys_len,
        ref_len,
    }
}

/// chrF2 as sacreBLEU computes it by default (`CHRF()`): character n-grams 1..=6 over the text
/// with all whitespace removed, no word n-grams, beta = 2, case-sensitive; statistics are summed
/// over the corpus and precision/recall are averaged over the orders that both sides have.
/// Returns 0..=100. Panics when `hyps` and `refs` differ in length.
pub fn corpus_chrf(hyps: &[String], refs: &[String]) -> f64 {
    check_lengths(hyps, refs);
    const ORDER: usize = 6;
    // per order: [hyp n-grams, ref n-grams, matches]
    let mut stats = [[0usize; 3]; ORDER];
    for (h, r) in hyps.iter().zip(refs) {
        let hc: Vec<char> = h.chars().filter(|&c| !py_space(c)).collect();
        let rc: Vec<char> = r.chars().filter(|&c| !py_space(c)).collect();
        for n in 1..=ORDER {
            let ref_total = (rc.len() + 1).saturating_sub(n);
            let hyp_total = (hc.len() + 1).saturating_sub(n);
            if ref_total == 0 {
                // sacreBLEU does not count hypothesis n-grams when the reference has none
                continue;
            }
            stats[n - 1][0] += hyp_total;
            stats[n - 1][1] += ref_total;
            if hyp_total == 0 {
                continue;
            }
            let rcount = count(rc.windows(n));
            let hcount = count(hc.windows(n));
            stats[n - 1][2] += hcount
                .iter()
                .map(|(g, c)| rcount.get(g).map_or(0, |r| (*c).min(*r)))
                .sum::<usize>();
        }
    }
    chrf_from_stats(&stats, 2.0)
}

fn chrf_from_stats(stats: &[[usize; 3]], beta: f64) -> f64 {
    let factor = beta * beta;
    let (mut avg_prec, mut avg_rec, mut eff) = (0.0f64, 0.0f64, 0usize);
    for &[n_hyp, n_ref, n_match] in stats {
        if n_hyp > 0 && n_ref > 0 {
            avg_prec += n_match as f64 / n_hyp as f64;
            avg_rec += n_match as f64 / n_ref as f64;
            eff += 1;
        }
    }
    if eff == 0 {
        return 0.0;
    }
    avg_prec /= eff as f64;
    avg_rec /= eff as f64;
    if avg_prec + avg_rec == 0.0 {
        return 0.0;
    }
    let mut score = (1.0 + factor) * avg_prec * avg_rec;
    score /= (factor * avg_prec) + avg_rec;
    100.0 * score
}

/// Levenshtein distance (unit costs) between two sequences.
pub fn edit_distance<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    if a.is_empty() {
        return b.len();
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0usize; b.len() + 1];
    for (i, x) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(x != y);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn error_rate(dist: usize, ref_len: usize) -> f64 {
    // an empty reference side: 0 when the hypotheses are empty too, else every symbol is an error
    dist as f64 / ref_len.max(1) as f64
}

/// Character error rate: sum of character (Unicode scalar) edit distances over the sum of
/// reference characters. A fraction (0 = perfect; may exceed 1). Panics on a length mismatch.
pub fn cer(hyps: &[String], refs: &[String]) -> f64 {
    check_lengths(hyps, refs);
    let (mut dist, mut n) = (0usize, 0usize);
    for (h, r) in hyps.iter().zip(refs) {
        let hc: Vec<char> = h.chars().collect();
        let rc: Vec<char> = r.chars().collect();
        dist += edit_distance(&hc, &rc);
        n += rc.len();
    }
    error_rate(dist, n)
}

/// Word error rate: like [`cer`] over whitespace-separated words.
pub fn wer(hyps: &[String], refs: &[String]) -> f64 {
    check_lengths(hyps, refs);
    let (mut dist, mut n) = (0usize, 0usize);
    for (h, r) in hyps.iter().zip(refs) {
        let hw: Vec<&str> = h.split_whitespace().collect();
        let rw: Vec<&str> = r.split_whitespace().collect();
        dist += edit_distance(&hw, &rw);
        n += rw.len();
    }
    error_rate(dist, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use sha2::{Digest, Sha256};
    use std::path::Path;

    fn strings(v: &Value) -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    }

    fn close(a: f64, b: f64, what: &str) {
        assert!(a.is_finite(), "{what}: {a} is not finite");
        assert!((a - b).abs() <= 1e-6, "{what}: ours {a} vs sacreBLEU {b}");
    }

    /// Recompute every case of `tests/fixtures/sacrebleu/cases.json` (made by the real sacreBLEU
    /// with make_fixture.py) and agree to 1e-6.
    #[test]
    fn agrees_with_sacrebleu_fixture() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text =
            std::fs::read_to_string(root.join("tests/fixtures/sacrebleu/cases.json")).unwrap();
        let fx: Value = serde_json::from_str(&text).unwrap();
        let mut sets = HashMap::new();
        for s in fx["sets"].as_array().unwrap() {
            let name = s["name"].as_str().unwrap().to_string();
            let hyps = strings(&s["hyps"]);
            let refs = if let Some(rel) = s["ref_file"].as_str() {
                let n = s["first"].as_u64().unwrap() as usize;
                // Tatoeba is bundled in data/; Multi30k only in ../shared/data (skipped without it).
                let bundled = root.join("data").join(rel);
                let path = if bundled.is_file() {
                    bundled
                } else {
                    let shared = root.join("../shared/data").join(rel);
                    if !shared.is_file() {
                        eprintln!("skipped set {name}: {} is not present", shared.display());
                        continue;
                    }
                    shared
                };
                let c = crate::data::read_tsv(&path).unwrap();
                let refs: Vec<String> = c.pairs[..n].iter().map(|p| p.tgt.clone()).collect();
                let sha = hex::encode(Sha256::digest(refs.join("\n").as_bytes()));
                assert_eq!(
                    sha,
                    s["refs_sha256"].as_str().unwrap(),
                    "{rel} changed since the fixture was made"
                );
                refs
            } else {
                strings(&s["refs"])
            };
            assert_eq!(hyps.len(), refs.len());
            sets.insert(name, (hyps, refs));
        }
        assert!(
            sets.contains_key("tatoeba-it-200"),
            "the bundled set is always checked"
        );
        let cases = fx["cases"].as_array().unwrap();
        assert!(cases.len() > 100);
        for c in cases {
            let name = c["name"].as_str().unwrap();
            let set = name.split('/').next().unwrap();
            let Some((hyps, refs)) = sets.get(set) else {
                continue;
            };
            let idx: Vec<usize> = c["indices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as usize)
                .collect();
            let h: Vec<String> = idx.iter().map(|&i| hyps[i].clone()).collect();
            let r: Vec<String> = idx.iter().map(|&i| refs[i].clone()).collect();
            let b = corpus_bleu(&h, &r);
            close(
                b.score,
                c["bleu"].as_f64().unwrap(),
                &format!("{name} bleu"),
            );
            close(b.bp, c["bp"].as_f64().unwrap(), &format!("{name} bp"));
            for (k, p) in c["precisions"].as_array().unwrap().iter().enumerate() {
                close(
                    b.precisions[k],
                    p.as_f64().unwrap(),
                    &format!("{name} p{}", k + 1),
                );
            }
            assert_eq!(
                b.sys_len as u64,
                c["sys_len"].as_u64().unwrap(),
                "{name} sys_len"
            );
            assert_eq!(
                b.ref_len as u64,
                c["ref_len"].as_u64().unwrap(),
                "{name} ref_len"
            );
            close(
                corpus_chrf(&h, &r),
                c["chrf"].as_f64().unwrap(),
                &format!("{name} chrf"),
            );
        }
        for t in fx["tokenize_13a"].as_array().unwrap() {
            let input = t["input"].as_str().unwrap();
            assert_eq!(
                tokenize_13a(input),
                t["output"].as_str().unwrap(),
                "13a of {input:?}"
            );
        }
    }

    fn v(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn edge_cases_are_finite() {
        let refs = v(&["Il gatto dorme sul divano.", "Tom è qui."]);
        let b = corpus_bleu(&refs, &refs);
        assert!((b.score - 100.0).abs() < 1e-9 && b.bp == 1.0);
        assert!((corpus_chrf(&refs, &refs) - 100.0).abs() < 1e-9);
        assert_eq!((cer(&refs, &refs), wer(&refs, &refs)), (0.0, 0.0));

        let empty = v(&["", ""]);
        let b = corpus_bleu(&empty, &refs);
        assert_eq!((b.score, b.bp, b.sys_len), (0.0, 0.0, 0));
        assert_eq!(corpus_chrf(&empty, &refs), 0.0);
        assert_eq!(cer(&empty, &refs), 1.0);
        assert_eq!(wer(&empty, &refs), 1.0);

        let none: Vec<String> = Vec::new();
        assert_eq!(corpus_bleu(&none, &none).score, 0.0);
        assert_eq!(corpus_chrf(&none, &none), 0.0);
        assert_eq!((cer(&none, &none), wer(&none, &none)), (0.0, 0.0));
        // empty references: no NaN
        let b = corpus_bleu(&refs, &empty);
        assert!(b.score.is_finite() && corpus_chrf(&refs, &empty).is_finite());
        assert!(cer(&refs, &empty).is_finite() && wer(&refs, &empty).is_finite());
        assert_eq!(corpus_bleu(&empty, &empty).score, 0.0);
    }

    #[test]
    fn error_rates_count_edits() {
        assert_eq!(
            edit_distance(
                &['k', 'i', 't', 't', 'e', 'n'],
                &['s', 'i', 't', 't', 'i', 'n', 'g']
            ),
            3
        );
        // one substitution + one deletion over 2 + 3 reference words
        let h = v(&["il cane", "Tom qui"]);
        let r = v(&["il gatto", "Tom è qui"]);
        assert!((wer(&h, &r) - 2.0 / 5.0).abs() < 1e-12);
        // chars: "cane" vs "gatto" = 4 edits... computed independently below
        let d1 = edit_distance(
            &"il cane".chars().collect::<Vec<_>>(),
            &"il gatto".chars().collect::<Vec<_>>(),
        );
        let d2 = edit_distance(
            &"Tom qui".chars().collect::<Vec<_>>(),
            &"Tom è qui".chars().collect::<Vec<_>>(),
        );
        assert_eq!(d2, 2, "'è' is one character");
        assert!((cer(&h, &r) - (d1 + d2) as f64 / 17.0).abs() < 1e-12);
    }
}
