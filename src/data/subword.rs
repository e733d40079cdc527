//! Subword tokenizers: why a second kind at all? With word-level vocabularies on small corpora
//! `[UNK]` is among the most frequent labels (4% of Tatoeba en-it targets at min frequency 2),
//! and every real NMT toolkit uses subwords. Both kinds here come whole from the `tokenizers`
//! crate, normalizer to decoder, so the saved JSON alone reproduces encoding and decoding:
//!
//! * `bpe`: byte-level BPE (GPT-2 style). The 256 byte symbols are always in the vocabulary,
//!   so no text is ever `[UNK]`; the ByteLevel decoder rejoins the bytes.
//! * `unigram`: a SentencePiece-style unigram LM over Metaspace pieces (`▁` marks a word
//!   start); the Metaspace decoder turns `▁` back into spaces. Characters never seen in
//!   training are `[UNK]`.
//!
//! Both normalize first (NFKC, every run of white space one space, trimmed), so a round trip
//! `decode(encode(text))` gives the normalized text back.

use super::tokenizer::tok_err;
use super::{DataError, SPECIAL_TOKENS, UNK_ID};
use crate::config::TokenizerKind;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::metaspace::{Metaspace as MetaspaceDecoder, PrependScheme};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::strip::Strip;
use tokenizers::normalizers::unicode::NFKC;
use tokenizers::normalizers::utils::Sequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::Metaspace;
use tokenizers::{AddedToken, NormalizerWrapper, Tokenizer};

fn specials() -> Vec<AddedToken> {
    SPECIAL_TOKENS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect()
}

fn normalizer() -> Result<NormalizerWrapper, DataError> {
    Ok(NormalizerWrapper::Sequence(Sequence::new(vec![
        NFKC.into(),
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(tok_err)?
        .into(),
        Strip::new(true, true).into(),
    ])))
}

/// Train a `kind` (bpe or unigram) tokenizer of about `vocab_size` ids (specials included) on
/// `texts`. `min_frequency` is the BPE merge threshold.
pub(super) fn train(
    kind: TokenizerKind,
    texts: Vec<&str>,
    vocab_size: usize,
    min_frequency: u64,
) -> Result<Tokenizer, DataError> {
    match kind {
        TokenizerKind::Bpe => {
            let model = BPE::builder()
                .unk_token(SPECIAL_TOKENS[UNK_ID as usize].to_string())
                .build()
                .map_err(tok_err)?;
            let mut t = Tokenizer::new(model);
            t.with_normalizer(Some(normalizer()?));
            t.with_pre_tokenizer(Some(ByteLevel::new(true, true, true)));
            t.with_decoder(Some(ByteLevelDecoder::default()));
            let trainer = BpeTrainer::builder()
                .vocab_size(vocab_size)
                .min_frequency(min_frequency)
                .show_progress(false)
                .special_tokens(specials())
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build();
            let mut trainer = TrainerWrapper::from(trainer);
            t.train(&mut trainer, texts.into_iter()).map_err(tok_err)?;
            Ok(t)
        }
        TokenizerKind::Unigram => {
            let mut t = Tokenizer::new(Unigram::default());
            t.with_normalizer(Some(normalizer()?));
            t.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
            t.with_decoder(Some(MetaspaceDecoder::new(
                '▁',
                PrependScheme::Always,
                true,
            )));
            let trainer = UnigramTrainer::builder()
                .vocab_size(vocab_size as u32)
                .show_progress(false)
                .special_tokens(specials())
                .unk_token(Some(SPECIAL_TOKENS[UNK_ID as usize].to_string()))
                .build()
                .map_err(tok_err)?;
            let mut trainer = TrainerWrapper::from(trainer);
            t.train(&mut trainer, texts.into_iter()).map_err(tok_err)?;
            Ok(t)
        }
        TokenizerKind::Word => Err(DataError::Tokenizer(
            "the word-level tokenizer is not a subword tokenizer".into(),
        )),
    }
}

/// Subword ids (specials already filtered by the caller, `[UNK]` kept when present) back to
/// text with the tokenizer's own decoder.
pub(super) fn decode(t: &Tokenizer, ids: &[u32]) -> String {
    match t.decode(ids, false) {
        Ok(s) => s.trim().to_string(),
        // the decoders used here do not fail on ids from the vocabulary; stay total anyway
        Err(_) => ids
            .iter()
            .filter_map(|&i| t.id_to_token(i))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{read_tsv, TextTokenizer, TokenizerOptions, EOS_ID, SOS_ID, UNK_ID};
    use super::*;
    use std::collections::HashSet;
    use std::path::{Path, PathBuf};

    /// A corpus bundled in the repository's `data/`.
    fn bundled(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(rel)
    }

    fn opts(kind: TokenizerKind, vocab_size: usize) -> TokenizerOptions {
        TokenizerOptions {
            kind,
            vocab_size,
            min_frequency: 2,
        }
    }

    /// Italian side of Tatoeba en-it: (train targets, validation targets).
    fn it_texts() -> (Vec<String>, Vec<String>) {
        let tr = read_tsv(&bundled("tatoeba-en-it/train.en-it.tsv")).unwrap();
        let va = read_tsv(&bundled("tatoeba-en-it/valid.en-it.tsv")).unwrap();
        (
            tr.pairs.into_iter().map(|p| p.tgt).collect(),
            va.pairs.into_iter().map(|p| p.tgt).collect(),
        )
    }

    fn train_on(kind: TokenizerKind, vocab: usize, texts: &[String]) -> TextTokenizer {
        TextTokenizer::train_with(texts.iter().map(|s| s.as_str()), &opts(kind, vocab)).unwrap()
    }

    fn unk_share(t: &TextTokenizer, texts: &[String]) -> f64 {
        let (mut unk, mut n) = (0usize, 0usize);
        for s in texts {
            let ids = t.encode(s);
            unk += ids.iter().filter(|&&i| i == UNK_ID).count();
            n += ids.len();
        }
        unk as f64 / n as f64
    }

    #[test]
    fn bpe_round_trip_of_unseen_sentences_gives_back_the_normalized_text() {
        let (train, valid) = it_texts();
        let t = train_on(TokenizerKind::Bpe, 4000, &train);
        assert_eq!(t.kind(), TokenizerKind::Bpe);
        assert!(
            (3000..=4000).contains(&t.vocab_size()),
            "{}",
            t.vocab_size()
        );
        for s in &valid {
            let mut ids = vec![SOS_ID];
            ids.extend(t.encode(s));
            ids.push(EOS_ID);
            assert_eq!(t.decode(&ids), t.normalize(s), "{s:?}");
        }
        // the normalizer: NFKC, white space runs collapsed, trimmed
        assert_eq!(t.normalize("  Ciao,\t  Tom!  "), "Ciao, Tom!");
        assert_eq!(t.normalize("ﬁne"), "fine");
    }

    #[test]
    fn unigram_round_trip_of_unseen_sentences_gives_back_the_normalized_text() {
        let (train, valid) = it_texts();
        let t = train_on(TokenizerKind::Unigram, 4000, &train);
        assert_eq!(t.kind(), TokenizerKind::Unigram);
        let seen: HashSet<char> = train
            .iter()
            .flat_map(|s| t.normalize(s).chars().collect::<Vec<_>>())
            .collect();
        let mut checked = 0;
        for s in &valid {
            let norm = t.normalize(s);
            // a character never seen in training is [UNK] for a unigram model
            if !norm.chars().all(|c| c == ' ' || seen.contains(&c)) {
                continue;
            }
            assert_eq!(t.decode(&t.encode(s)), norm, "{s:?}");
            checked += 1;
        }
        assert!(
            checked * 100 >= valid.len() * 99,
            "{checked}/{}",
            valid.len()
        );
    }

    #[test]
    fn subwords_leave_almost_no_unknown_tokens_where_words_leave_many() {
        let (train, valid) = it_texts();
        let word = TextTokenizer::train(train.iter().map(|s| s.as_str()), 2).unwrap();
        let w = unk_share(&word, &valid);
        let b = unk_share(&train_on(TokenizerKind::Bpe, 4000, &train), &valid);
        let u = unk_share(&train_on(TokenizerKind::Unigram, 4000, &train), &valid);
        eprintln!("[UNK] share of validation targets: word {w:.4}, bpe {b:.4}, unigram {u:.4}");
        assert!(w > 0.02, "word-level [UNK] share {w}");
        assert_eq!(b, 0.0, "byte-level BPE never needs [UNK]");
        assert!(u < 0.001, "unigram [UNK] share {u}");
    }

    #[test]
    fn subword_pieces_decode_to_whole_words() {
        let (train, _) = it_texts();
        for kind in [TokenizerKind::Bpe, TokenizerKind::Unigram] {
            // a small vocabulary, so long words are split into several pieces
            let t = train_on(kind, 600, &train);
            let s = "Tom non capisce perché l'insegnante è arrabbiata.";
            let ids = t.encode(s);
            let words = s.split(' ').count();
            assert!(ids.len() > words + 2, "{kind:?}: {} pieces", ids.len());
            assert_eq!(t.decode(&ids), s, "{kind:?}");
            // a saved file reproduces encoding and decoding (normalizer and decoder included)
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("t.json");
            t.save(&p).unwrap();
            let back = TextTokenizer::from_file(&p).unwrap();
            assert_eq!(back.kind(), kind);
            assert_eq!(back.encode(s), ids);
            assert_eq!(back.decode(&ids), s);
        }
    }

    #[test]
    fn drop_policy_leaves_unknown_tokens_out_of_the_text() {
        let (train, _) = it_texts();
        let t = train_on(TokenizerKind::Unigram, 2000, &train);
        let mut ids = t.encode("Tom è qui.");
        ids.insert(1, UNK_ID);
        assert!(t.decode(&ids).contains("[UNK]"));
        assert_eq!(t.decode_with(&ids, true), "Tom è qui.");
        let w = TextTokenizer::train(train.iter().map(|s| s.as_str()), 2).unwrap();
        let mut ids = w.encode("Tom è qui.");
        ids.insert(1, UNK_ID);
        assert_eq!(w.decode(&ids), "Tom [UNK] è qui.");
        assert_eq!(w.decode_with(&ids, true), "Tom è qui.");
    }
}
