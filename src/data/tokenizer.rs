//! The tokenizer every corpus goes through: word-level (a `tokenizers` WordLevel model behind the
//! Whitespace pre-tokenizer, joined back by a small rule-based detokenizer) or subword (byte-level
//! BPE or unigram, built in [`super::subword`], joined back by the crate's own decoders), and
//! the content-addressed tokenizer cache.

use super::{subword, DataError, EOS_ID, PAD_ID, SOS_ID, SPECIAL_TOKENS, UNK_ID};
use crate::config::TokenizerKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tokenizers::models::wordlevel::{WordLevel, WordLevelTrainer};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::{AddedToken, Tokenizer};

pub(super) fn tok_err(e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(e.to_string())
}

/// How to train a tokenizer (the `data.*` fields that shape it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizerOptions {
    pub kind: TokenizerKind,
    /// Subword vocabulary size, specials included (ignored by `word`).
    pub vocab_size: usize,
    /// Minimum frequency of a word (`word`) or of a merge (`bpe`); ignored by `unigram`.
    pub min_frequency: u64,
}

impl TokenizerOptions {
    pub fn word(min_frequency: u64) -> Self {
        Self {
            kind: TokenizerKind::Word,
            vocab_size: 0,
            min_frequency,
        }
    }

    pub fn from_spec(d: &crate::config::DataSpec) -> Self {
        Self {
            kind: d.tokenizer,
            vocab_size: d.vocab_size,
            min_frequency: d.min_frequency,
        }
    }
}

/// A trained tokenizer with the fixed special ids `[UNK]`=0, `[PAD]`=1, `[SOS]`=2, `[EOS]`=3
/// (checked on every construction). Word-level: `\w+|[^\w\s]+` pieces, one id per piece,
/// unknown pieces map to [`UNK_ID`]. Subword: see [`super::subword`]. The kind is read from
/// the model inside the `tokenizers` JSON, so a saved file is all it takes to load one.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    kind: TokenizerKind,
}

/// The historical name (every tokenizer was word-level once).
pub type WordTokenizer = TextTokenizer;

fn kind_of(t: &Tokenizer, path: &Path) -> Result<TokenizerKind, DataError> {
    match t.get_model() {
        ModelWrapper::WordLevel(_) => Ok(TokenizerKind::Word),
        ModelWrapper::BPE(_) => Ok(TokenizerKind::Bpe),
        ModelWrapper::Unigram(_) => Ok(TokenizerKind::Unigram),
        ModelWrapper::WordPiece(_) => Err(DataError::UnsupportedModel {
            path: path.to_path_buf(),
            model: "WordPiece",
        }),
    }
}

impl TextTokenizer {
    /// Train a word-level tokenizer on `texts` (one sentence each) with `tokenizers`'
    /// WordLevelTrainer: the specials first, then every word seen at least `min_frequency`
    /// times, most frequent first (ties by word, so the result is deterministic). There is no
    /// vocabulary size cap.
    pub fn train<'a>(
        texts: impl IntoIterator<Item = &'a str>,
        min_frequency: u64,
    ) -> Result<Self, DataError> {
        Self::train_with(texts, &TokenizerOptions::word(min_frequency))
    }

    /// Train the kind of tokenizer `opts` names on `texts`.
    pub fn train_with<'a>(
        texts: impl IntoIterator<Item = &'a str>,
        opts: &TokenizerOptions,
    ) -> Result<Self, DataError> {
        let texts: Vec<&str> = texts.into_iter().collect();
        if texts.iter().all(|t| t.trim().is_empty()) {
            return Err(DataError::NoTrainingText);
        }
        let inner = match opts.kind {
            TokenizerKind::Word => train_word(texts, opts.min_frequency)?,
            kind => subword::train(kind, texts, opts.vocab_size, opts.min_frequency)?,
        };
        let t = Self {
            inner,
            kind: opts.kind,
        };
        t.check_specials("<trained>")?;
        Ok(t)
    }

    fn check_specials(&self, path: &str) -> Result<(), DataError> {
        for (i, tok) in SPECIAL_TOKENS.iter().enumerate() {
            let found = self.inner.token_to_id(tok);
            if found != Some(i as u32) {
                return Err(DataError::SpecialTokens {
                    path: path.to_string(),
                    token: tok,
                    expected: i as u32,
                    found,
                });
            }
        }
        Ok(())
    }

    /// Load a tokenizer saved by [`TextTokenizer::save`] (the `tokenizers` JSON format); the
    /// special ids are verified and the kind is read from the model.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        let kind = kind_of(&inner, path)?;
        let t = Self { inner, kind };
        t.check_specials(&path.display().to_string())?;
        Ok(t)
    }

    /// Save in the `tokenizers` JSON format, atomically (temporary file in the same directory,
    /// then rename), so a reader never sees a half-written file.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tokenizer.json".into());
        // unique per process and call: several trainers in one server may save the same key
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_file_name(format!(".{name}.tmp-{}-{seq}", std::process::id()));
        self.inner
            .save(&tmp, false)
            .map_err(|e| DataError::Tokenizer(format!("cannot write {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            DataError::io("rename into", path, e)
        })
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Token ids only (no `[SOS]`/`[EOS]`); unknown words give [`UNK_ID`]. Special-token strings
    /// typed in the text (`[PAD]`, ...) are not passed through as specials: they become
    /// [`UNK_ID`].
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let enc = self
            .inner
            .encode(text, false)
            .expect("encoding cannot fail once [UNK] is in the vocabulary");
        enc.get_ids()
            .iter()
            .map(|&id| if id <= EOS_ID { UNK_ID } else { id })
            .collect()
    }

    /// `text` as the tokenizer's normalizer sees it (subwords: NFKC, runs of white space made
    /// one space, trimmed); unchanged for word-level. A subword round trip
    /// `decode(encode(text))` gives exactly this when every character is known.
    pub fn normalize(&self, text: &str) -> String {
        match self.inner.get_normalizer() {
            Some(n) => {
                use tokenizers::tokenizer::{NormalizedString, Normalizer};
                let mut s = NormalizedString::from(text);
                match n.normalize(&mut s) {
                    Ok(()) => s.get().to_string(),
                    Err(_) => text.to_string(),
                }
            }
            None => text.to_string(),
        }
    }

    /// The text of `ids` up to the first `[EOS]`, without `[PAD]`/`[SOS]`: word-level tokens
    /// joined by [`detokenize`], subwords by the crate's decoder (ByteLevel, Metaspace).
    /// `[UNK]` is kept visible as `[UNK]`; ids outside the vocabulary too.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_with(ids, false)
    }

    /// [`Self::decode`], leaving `[UNK]` out of the text when `drop_unk` (the `drop` policy).
    pub fn decode_with(&self, ids: &[u32], drop_unk: bool) -> String {
        let mut kept = Vec::with_capacity(ids.len());
        for &id in ids {
            match id {
                EOS_ID => break,
                PAD_ID | SOS_ID => continue,
                UNK_ID if drop_unk => continue,
                _ if (id as usize) >= self.vocab_size() => {
                    if !drop_unk {
                        kept.push(UNK_ID)
                    }
                }
                _ => kept.push(id),
            }
        }
        match self.kind {
            TokenizerKind::Word => {
                let toks: Vec<String> = kept
                    .iter()
                    .map(|&id| {
                        self.inner
                            .id_to_token(id)
                            .unwrap_or_else(|| SPECIAL_TOKENS[UNK_ID as usize].to_string())
                    })
                    .collect();
                detokenize(&toks)
            }
            _ => subword::decode(&self.inner, &kept),
        }
    }

    /// Vocabulary size including the four specials.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

fn train_word(texts: Vec<&str>, min_frequency: u64) -> Result<Tokenizer, DataError> {
    let model = WordLevel::builder()
        .unk_token(SPECIAL_TOKENS[UNK_ID as usize].to_string())
        .build()
        .map_err(tok_err)?;
    let mut inner = Tokenizer::new(model);
    inner.with_pre_tokenizer(Some(Whitespace));
    let trainer = WordLevelTrainer::builder()
        .min_frequency(min_frequency)
        .vocab_size(usize::MAX)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .build()
        .map_err(tok_err)?;
    let mut trainer = TrainerWrapper::from(trainer);
    inner
        .train(&mut trainer, texts.into_iter())
        .map_err(tok_err)?;
    Ok(inner)
}

fn is_wordish(t: &str) -> bool {
    t == SPECIAL_TOKENS[UNK_ID as usize] || t.chars().next().is_some_and(|c| c.is_alphanumeric())
}

fn is_digits(t: &str) -> bool {
    !t.is_empty() && t.chars().all(|c| c.is_ascii_digit())
}

fn is_apostrophe(t: &str) -> bool {
    matches!(t, "'" | "’" | "`")
}

/// Join word-level tokens into text. Rules, applied left to right:
/// * no space before a token starting with `, . ! ? ; : ) ] } %`, none after one ending in `( [ {`;
/// * a lone apostrophe (`'`, `’`) joins its left word, and also the right word unless the left
///   word is a plural/elision that ends there (a word longer than one letter ending in `s`, e.g.
///   "students' books", "Hans' Auto", a number as in "4' tall", or the Italian "po'", "di'",
///   "fa'", "va'", "sta'", "da'") and the right word is not an English contraction suffix
///   (s, t, ll, re, ve, d, m): "l ' inglese" → "l'inglese", "Cos ' ha" → "Cos'ha",
///   "don ' t" → "don't", "qu ' il" → "qu'il", "geht ' s" → "geht's";
/// * `-` between two words joins them ("T - shirt" → "T-shirt");
/// * `.` and `:` between digit runs join them, and `,` before exactly three digits ("3 . 5" →
///   "3.5", "10 : 30" → "10:30", "1 , 000" → "1,000", but "20, 2013");
/// * straight double quotes alternate: an opening `"` joins the next token, a closing one (or a
///   punctuation run holding `"` such as `."` or `".`) joins the previous; `„ « “` open and
///   `” »` close (`“` closes after `„`, as in German).
///
/// Quotes written with single apostrophes are not distinguished from elisions, and French
/// spacing before `! ? ; :` is not restored; metrics tokenize (13a) or strip spaces (chrF)
/// before comparing, so these only affect what a person reads.
pub fn detokenize<S: AsRef<str>>(tokens: &[S]) -> String {
    let toks: Vec<&str> = tokens.iter().map(|t| t.as_ref()).collect();
    let mut out = String::new();
    let mut glue_next = false;
    let mut quote_open = false;
    let mut low_quote_open = false;
    for (i, &t) in toks.iter().enumerate() {
        let prev = if i > 0 { Some(toks[i - 1]) } else { None };
        let next = toks.get(i + 1).copied();
        let mut glue_left = glue_next;
        glue_next = false;
        let first = t.chars().next().unwrap_or(' ');
        if ",.!?;:)]}%".contains(first) {
            glue_left = true;
        }
        if t.ends_with(['(', '[', '{']) {
            glue_next = true;
        }
        if is_apostrophe(t) {
            if let Some(p) = prev.filter(|p| is_wordish(p)) {
                glue_left = true;
                let lower = p.to_lowercase();
                let ends_word = is_digits(p)
                    || (lower.chars().count() > 1 && lower.ends_with('s') && lower != "cos")
                    || matches!(lower.as_str(), "po" | "di" | "fa" | "va" | "sta" | "da");
                let contraction =
                    next.is_some_and(|n| matches!(n, "s" | "t" | "ll" | "re" | "ve" | "d" | "m"));
                if (contraction || !ends_word) && next.is_some_and(is_wordish) {
                    glue_next = true;
                }
            } else if next.is_some_and(is_wordish) {
                glue_next = true;
            }
        }
        if t == "-" && prev.is_some_and(is_wordish) && next.is_some_and(is_wordish) {
            glue_left = true;
            glue_next = true;
        }
        if prev.is_some_and(is_digits)
            && next.is_some_and(is_digits)
            && (matches!(t, "." | ":") || (t == "," && next.is_some_and(|n| n.len() == 3)))
        {
            glue_left = true;
            glue_next = true;
        }
        if t == "\"" {
            if quote_open {
                glue_left = true;
            } else {
                glue_next = true;
            }
            quote_open = !quote_open;
        } else if t.len() > 1 && t.contains('"') && !is_wordish(t) && quote_open {
            // a punctuation run holding the closing quote: `."`, `".`, `?"`
            glue_left = true;
            quote_open = false;
        } else if matches!(first, '”' | '»') || (first == '“' && low_quote_open) {
            glue_left = true;
            low_quote_open = false;
        } else if matches!(t, "„" | "«" | "“") {
            glue_next = true;
            low_quote_open = t == "„";
        }
        if i > 0 && !glue_left {
            out.push(' ');
        }
        out.push_str(t);
    }
    out
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The cache file name for a tokenizer: `tokenizer-{lang}-{hash16}-min{f}.json` (word-level)
/// or `tokenizer-{lang}-{hash16}-{bpe|unigram}{vocab}-min{f}.json` (subword).
pub fn tokenizer_file_name(lang: &str, content_hash: &str, opts: &TokenizerOptions) -> String {
    let hash16: String = content_hash.chars().take(16).collect();
    let kind = match opts.kind {
        TokenizerKind::Word => String::new(),
        k => format!("-{}{}", k.as_str(), opts.vocab_size),
    };
    format!(
        "tokenizer-{}-{}{kind}-min{}.json",
        sanitize(lang),
        sanitize(&hash16),
        opts.min_frequency
    )
}

/// Cached by corpus content hash + language + the tokenizer options (NOT by language alone):
/// file name [`tokenizer_file_name`] inside `dir`. Loads when present, else trains and saves.
/// A cached file that fails to load (or has wrong special ids) is retrained and replaced, with a
/// warning. `texts` is only consumed when training.
pub fn load_or_train_tokenizer<'a>(
    dir: &Path,
    lang: &str,
    content_hash: &str,
    opts: &TokenizerOptions,
    texts: impl IntoIterator<Item = &'a str>,
) -> Result<(TextTokenizer, PathBuf), DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io("create directory", dir, e))?;
    let path = dir.join(tokenizer_file_name(lang, content_hash, opts));
    if path.exists() {
        match TextTokenizer::from_file(&path) {
            Ok(t) if t.kind() == opts.kind => return Ok((t, path)),
            Ok(t) => tracing::warn!(
                "retraining tokenizer: cached {} is {:?}, not {:?}",
                path.display(),
                t.kind(),
                opts.kind
            ),
            Err(e) => tracing::warn!(
                "retraining tokenizer: cached {} unusable: {e}",
                path.display()
            ),
        }
    }
    let t = TextTokenizer::train_with(texts, opts)?;
    t.save(&path)?;
    Ok((t, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::read_tsv;

    use crate::data::corpus::tests::{bundled, shared_or_skip};

    fn squash(s: &str) -> String {
        s.chars().filter(|c| !c.is_whitespace()).collect()
    }

    #[test]
    fn trains_on_real_text_with_fixed_specials_and_round_trips_files() {
        let c = read_tsv(&bundled("tatoeba-en-it/train.en-it.tsv")).unwrap();
        let it = WordTokenizer::train(c.pairs.iter().map(|p| p.tgt.as_str()), 2).unwrap();
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(it.token_to_id(s), Some(i as u32));
            assert_eq!(it.id_to_token(i as u32).as_deref(), Some(*s));
        }
        assert!(it.vocab_size() > 1000, "vocab {}", it.vocab_size());
        // min_frequency 1 keeps strictly more words
        let it1 = WordTokenizer::train(c.pairs.iter().map(|p| p.tgt.as_str()), 1).unwrap();
        assert!(it1.vocab_size() > it.vocab_size());
        // most frequent Italian piece first after the specials: punctuation or a common word
        let ids = it.encode("Tom non aveva molto denaro con sé.");
        assert_eq!(ids.len(), 8);
        assert!(ids.iter().all(|&i| i > EOS_ID));
        assert_eq!(
            it.encode("zzqxw Tom"),
            vec![UNK_ID, it.token_to_id("Tom").unwrap()]
        );
        assert_eq!(it.encode("[PAD] [EOS] Tom")[..2], [UNK_ID, UNK_ID]);

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("it.json");
        it.save(&p).unwrap();
        let back = WordTokenizer::from_file(&p).unwrap();
        assert_eq!(back.vocab_size(), it.vocab_size());
        let valid = read_tsv(&bundled("tatoeba-en-it/valid.en-it.tsv")).unwrap();
        for pair in &valid.pairs {
            assert_eq!(back.encode(&pair.tgt), it.encode(&pair.tgt));
        }
        // no temporary file left behind
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // a file with wrong special ids is refused
        let json = std::fs::read_to_string(&p).unwrap();
        let swapped = json
            .replace("\"[PAD]\":1", "\"[PAD]\":X")
            .replace("\"[SOS]\":2", "\"[SOS]\":1")
            .replace("\"[PAD]\":X", "\"[PAD]\":2");
        assert_ne!(swapped, json);
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, swapped).unwrap();
        assert!(matches!(
            WordTokenizer::from_file(&bad),
            Err(DataError::SpecialTokens { .. })
        ));
    }

    #[test]
    fn decode_round_trips_real_sentences() {
        for (file, min_exact) in [
            ("tatoeba-en-it/valid.en-it.tsv", 0.99),
            ("multi30k/val.en-de.tsv", 0.99),
            ("multi30k/val.en-fr.tsv", 0.99),
        ] {
            let path = if file.starts_with("tatoeba") {
                bundled(file)
            } else {
                let Some(p) = shared_or_skip(file) else {
                    continue;
                };
                p
            };
            let c = read_tsv(&path).unwrap();
            let src = WordTokenizer::train(c.pairs.iter().map(|p| p.src.as_str()), 1).unwrap();
            let tgt = WordTokenizer::train(c.pairs.iter().map(|p| p.tgt.as_str()), 1).unwrap();
            let mut exact = 0;
            let mut n = 0;
            for p in &c.pairs {
                for (t, s) in [(&src, &p.src), (&tgt, &p.tgt)] {
                    let mut ids = vec![SOS_ID];
                    ids.extend(t.encode(s));
                    ids.extend([EOS_ID, PAD_ID, PAD_ID]);
                    let d = t.decode(&ids);
                    assert_eq!(squash(&d), squash(s), "{file}: {s:?} -> {d:?}");
                    n += 1;
                    if d == *s {
                        exact += 1;
                    } else if n - exact <= 4 {
                        eprintln!("not exact: {s:?} -> {d:?}");
                    }
                }
            }
            let rate = exact as f64 / n as f64;
            eprintln!("{file}: exact round trip {exact}/{n} = {rate:.4}");
            assert!(rate >= min_exact, "{file}: exact round trip rate {rate}");
        }
    }

    #[test]
    fn detokenizer_rules() {
        let d = |s: &str| detokenize(&s.split(' ').collect::<Vec<_>>());
        assert_eq!(
            d("Impariamo l ' inglese tutti i giorni ."),
            "Impariamo l'inglese tutti i giorni."
        );
        assert_eq!(d("I don ' t know , do you ?"), "I don't know, do you?");
        assert_eq!(d("Qu ' est - ce qu ' il fait ?"), "Qu'est-ce qu'il fait?");
        assert_eq!(d("Wie geht ' s ?"), "Wie geht's?");
        assert_eq!(d("the students ' books"), "the students' books");
        assert_eq!(d("Chris ' s car isn ' t here"), "Chris's car isn't here");
        assert_eq!(d("un po ' di pane"), "un po' di pane");
        assert_eq!(
            d("He said \" hello ( again ) .\""),
            "He said \"hello (again).\""
        );
        assert_eq!(
            d("It costs 3 . 50 dollars , 100 % at 10 : 30"),
            "It costs 3.50 dollars, 100% at 10:30"
        );
        assert_eq!(d("a T - shirt"), "a T-shirt");
        assert_eq!(
            d("on October 20 , 2013 , 1 , 000 people"),
            "on October 20, 2013, 1,000 people"
        );
        assert_eq!(
            d("Cos ' ha detto ? Di ' a Tom che è alto 6 ' 2"),
            "Cos'ha detto? Di' a Tom che è alto 6' 2"
        );
        assert_eq!(d("un panneau \" Viet Nam \"."), "un panneau \"Viet Nam\".");
        assert_eq!(
            d("Er sagt : „ Ja “ . He said “ yes ” ."),
            "Er sagt: „Ja“. He said “yes”."
        );
        assert_eq!(d("Stop [UNK] !"), "Stop [UNK]!");
        assert_eq!(detokenize::<&str>(&[]), "");
    }

    #[test]
    fn decode_stops_at_eos_and_skips_pad_sos() {
        let t = WordTokenizer::train(["a b c .", "a b"], 1).unwrap();
        let a = t.token_to_id("a").unwrap();
        let b = t.token_to_id("b").unwrap();
        let dot = t.token_to_id(".").unwrap();
        assert_eq!(t.decode(&[SOS_ID, a, PAD_ID, b, dot, EOS_ID, a, a]), "a b.");
        assert_eq!(t.decode(&[UNK_ID, a]), "[UNK] a");
        assert_eq!(t.decode(&[EOS_ID, a]), "");
        assert!(matches!(
            WordTokenizer::train(["", "  "], 1),
            Err(DataError::NoTrainingText)
        ));
    }

    #[test]
    fn cache_is_keyed_by_content_not_language_alone() {
        let dir = tempfile::tempdir().unwrap();
        let a = read_tsv(&bundled("tatoeba-en-it/test.en-it.tsv")).unwrap();
        let b = read_tsv(&bundled("tatoeba-en-it/valid.en-it.tsv")).unwrap();
        let (ta, pa) = load_or_train_tokenizer(
            dir.path(),
            "en",
            &a.content_hash,
            &TokenizerOptions::word(1),
            a.pairs.iter().map(|p| p.src.as_str()),
        )
        .unwrap();
        let (tb, pb) = load_or_train_tokenizer(
            dir.path(),
            "en",
            &b.content_hash,
            &TokenizerOptions::word(1),
            b.pairs.iter().map(|p| p.src.as_str()),
        )
        .unwrap();
        assert_ne!(pa, pb);
        assert_ne!(ta.vocab_size(), tb.vocab_size());
        let name = pa.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(
            name,
            format!("tokenizer-en-{}-min1.json", &a.content_hash[..16])
        );
        // same key -> loaded from disk: texts are ignored (an empty iterator would fail training)
        let (ta2, pa2) = load_or_train_tokenizer(
            dir.path(),
            "en",
            &a.content_hash,
            &TokenizerOptions::word(1),
            std::iter::empty(),
        )
        .unwrap();
        assert_eq!(pa2, pa);
        assert_eq!(ta2.vocab_size(), ta.vocab_size());
        // another min_frequency is another file
        let (_, pa3) = load_or_train_tokenizer(
            dir.path(),
            "en",
            &a.content_hash,
            &TokenizerOptions::word(2),
            a.pairs.iter().map(|p| p.src.as_str()),
        )
        .unwrap();
        assert_ne!(pa3, pa);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        // a corrupt cache file is retrained and replaced
        std::fs::write(&pa, "{ not json").unwrap();
        let (ta4, _) = load_or_train_tokenizer(
            dir.path(),
            "en",
            &a.content_hash,
            &TokenizerOptions::word(1),
            a.pairs.iter().map(|p| p.src.as_str()),
        )
        .unwrap();
        assert_eq!(ta4.vocab_size(), ta.vocab_size());
        assert!(WordTokenizer::from_file(&pa).is_ok());
    }
}
