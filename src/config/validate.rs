//! `TrainSpec::validate`: every range checked once, the error naming the first bad field and
//! what is allowed.

use super::{Schedule, SpecError, TokenizerKind, TrainSpec};

fn check(cond: bool, field: &str, msg: impl FnOnce() -> String) -> Result<(), SpecError> {
    if cond {
        Ok(())
    } else {
        Err(SpecError::new(field, msg()))
    }
}

fn range_usize(v: usize, lo: usize, hi: usize, field: &str) -> Result<(), SpecError> {
    check(v >= lo && v <= hi, field, || {
        format!("{v} is out of range; allowed {lo}..={hi}")
    })
}

fn range_f64(v: f64, lo: f64, hi: f64, field: &str) -> Result<(), SpecError> {
    check(v.is_finite() && v >= lo && v <= hi, field, || {
        format!("{v} is out of range; allowed {lo}..={hi}")
    })
}

impl TrainSpec {
    /// Check every range once. The error names the first bad field and the allowed range.
    pub fn validate(&self) -> Result<(), SpecError> {
        check(
            !self.name.trim().is_empty() && self.name.len() <= 100,
            "name",
            || "must be 1..=100 characters".into(),
        )?;
        check(
            self.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "name",
            || "may contain only letters, digits, '-', '_' and '.'".into(),
        )?;
        let d = &self.data;
        check(!d.train.as_os_str().is_empty(), "data.train", || {
            "must name a corpus file".into()
        })?;
        range_f64(d.valid_fraction, 0.0, 0.5, "data.valid_fraction")?;
        if d.valid.is_none() {
            check(d.valid_fraction > 0.0, "data.valid_fraction", || {
                "must be > 0 when data.valid is not given".into()
            })?;
        }
        for (v, f) in [
            (&d.src_lang, "data.src_lang"),
            (&d.tgt_lang, "data.tgt_lang"),
        ] {
            check(
                !v.is_empty()
                    && v.len() <= 16
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                f,
                || "must be a short language code such as `en`".into(),
            )?;
        }
        range_usize(d.max_len, 4, 4096, "data.max_len")?;
        check(d.min_frequency >= 1, "data.min_frequency", || {
            "must be >= 1".into()
        })?;
        match d.tokenizer {
            TokenizerKind::Word => {}
            // byte-level BPE starts from 256 byte symbols plus the 4 specials
            TokenizerKind::Bpe => range_usize(d.vocab_size, 300, 1_000_000, "data.vocab_size")?,
            TokenizerKind::Unigram => range_usize(d.vocab_size, 100, 1_000_000, "data.vocab_size")?,
        }

        let m = &self.model;
        range_usize(m.d_model, 8, 8192, "model.d_model")?;
        range_usize(m.layers, 1, 48, "model.layers")?;
        range_usize(m.heads, 1, 128, "model.heads")?;
        check(m.d_model.is_multiple_of(m.heads), "model.heads", || {
            format!("must divide model.d_model ({}) evenly", m.d_model)
        })?;
        range_usize(m.d_ff, 1, 65536, "model.d_ff")?;
        range_f64(m.dropout, 0.0, 0.9, "model.dropout")?;
        range_f64(m.norm_eps, 1e-12, 1e-2, "model.norm_eps")?;
        if m.tie_embeddings {
            check(d.joint_vocab, "model.tie_embeddings", || {
                "needs data.joint_vocab = true (one vocabulary for both sides)".into()
            })?;
        }

        let t = &self.train;
        range_usize(t.epochs, 1, 10_000, "train.epochs")?;
        range_usize(t.max_steps, 0, 100_000_000, "train.max_steps")?;
        range_usize(t.batch_size, 1, 4096, "train.batch_size")?;
        range_usize(t.max_tokens, 0, 1_000_000, "train.max_tokens")?;
        if t.max_tokens > 0 {
            check(t.max_tokens >= d.max_len, "train.max_tokens", || {
                format!("must be 0 or at least data.max_len ({})", d.max_len)
            })?;
        }
        check(
            t.lr.is_finite() && t.lr > 0.0 && t.lr <= 10.0,
            "train.lr",
            || format!("{} is out of range; allowed (0, 10]", t.lr),
        )?;
        range_usize(t.warmup_steps, 0, 10_000_000, "train.warmup_steps")?;
        if t.schedule == Schedule::Noam {
            check(t.warmup_steps > 0, "train.warmup_steps", || {
                "must be > 0 for the noam schedule".into()
            })?;
        }
        range_f64(t.beta1, 0.0, 0.999999, "train.beta1")?;
        range_f64(t.beta2, 0.0, 0.99999999, "train.beta2")?;
        check(
            t.eps.is_finite() && t.eps > 0.0 && t.eps <= 1.0,
            "train.eps",
            || format!("{} is out of range; allowed (0, 1]", t.eps),
        )?;
        range_f64(t.weight_decay, 0.0, 1.0, "train.weight_decay")?;
        range_f64(t.clip_grad_norm, 0.0, 1e6, "train.clip_grad_norm")?;
        range_f64(t.label_smoothing, 0.0, 0.99, "train.label_smoothing")?;
        range_usize(t.valid_every, 0, 100_000_000, "train.valid_every")?;
        range_usize(
            t.valid_every_epochs,
            0,
            1_000_000,
            "train.valid_every_epochs",
        )?;
        range_usize(
            t.valid_max_sentences,
            0,
            1_000_000,
            "train.valid_max_sentences",
        )?;
        range_usize(t.valid_samples, 0, 100, "train.valid_samples")?;
        if let Some(es) = &t.early_stopping {
            range_usize(es.patience, 1, 1_000_000, "train.early_stopping.patience")?;
        }
        range_f64(t.max_time_s, 0.0, 1e8, "train.max_time_s")?;

        let a = &self.amp;
        check(
            a.init_scale.is_finite() && a.init_scale >= 1.0 && a.init_scale <= 2f64.powi(100),
            "amp.init_scale",
            || format!("{} is out of range; allowed 1..=2^100", a.init_scale),
        )?;
        check(
            a.growth_factor.is_finite() && a.growth_factor > 1.0 && a.growth_factor <= 1e3,
            "amp.growth_factor",
            || format!("{} is out of range; allowed (1, 1000]", a.growth_factor),
        )?;
        check(
            a.backoff_factor.is_finite() && a.backoff_factor > 0.0 && a.backoff_factor < 1.0,
            "amp.backoff_factor",
            || format!("{} is out of range; allowed (0, 1)", a.backoff_factor),
        )?;
        check(
            (1..=10_000_000).contains(&a.growth_interval),
            "amp.growth_interval",
            || {
                format!(
                    "{} is out of range; allowed 1..=10000000",
                    a.growth_interval
                )
            },
        )?;
        check(
            a.min_scale.is_finite() && a.min_scale > 0.0 && a.min_scale <= a.init_scale,
            "amp.min_scale",
            || {
                format!(
                    "{} is out of range; allowed (0, amp.init_scale]",
                    a.min_scale
                )
            },
        )?;
        check(
            (1..=1_000_000).contains(&a.max_consecutive_skips),
            "amp.max_consecutive_skips",
            || "allowed 1..=1000000".into(),
        )?;
        check((1..=1000).contains(&a.hysteresis), "amp.hysteresis", || {
            "allowed 1..=1000".into()
        })?;
        check(
            a.underflow_every <= 100_000_000,
            "amp.underflow_every",
            || "allowed 0..=100000000".into(),
        )?;
        check(
            (1..=100).contains(&a.max_rollbacks),
            "amp.max_rollbacks",
            || "allowed 1..=100".into(),
        )?;
        if let Some(inj) = &a.test_inject_inf {
            check(
                !inj.tensor.is_empty() && inj.tensor.len() <= 200,
                "amp.test_inject_inf.tensor",
                || "must name a parameter".into(),
            )?;
            check(
                inj.from_step >= 1 && inj.count <= 100_000_000,
                "amp.test_inject_inf.from_step",
                || "from_step >= 1 and count <= 100000000".into(),
            )?;
        }

        range_usize(
            self.checkpoint.every_steps,
            0,
            100_000_000,
            "checkpoint.every_steps",
        )?;
        range_usize(self.checkpoint.keep_last, 1, 1000, "checkpoint.keep_last")?;
        check(
            self.checkpoint.average_last <= self.checkpoint.keep_last,
            "checkpoint.average_last",
            || {
                format!(
                    "{} is out of range; allowed 0..=checkpoint.keep_last ({})",
                    self.checkpoint.average_last, self.checkpoint.keep_last
                )
            },
        )?;
        Ok(())
    }
}
