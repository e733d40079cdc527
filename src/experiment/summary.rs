//! The comparison of an experiment's arms, from their step records and final validations:
//! throughput and speedup over the first arm, training loss at equal steps and at equal
//! training time, validation loss / BLEU / chrF, skipped steps, peak memory and a one-line
//! verdict. Pure math over plain numbers, so the server and the CLI give the same figures.
//!
//! Definitions:
//! - tokens/s: non-pad target tokens of all steps / summed step time (validation and checkpoint
//!   pauses are not in it); speedup: an arm's tokens/s over the first arm's.
//! - loss at equal steps: the mean training loss over the [`WINDOW`] steps up to the last step
//!   every arm reached (skipped steps and non-finite losses left out); at equal time: the same
//!   mean over the steps up to the moment (summed step time) every arm reached.
//! - noise: the verdict calls a BLEU difference "within noise" when it is at most
//!   `noise_bleu` points (default [`DEFAULT_NOISE_BLEU`]). This is a stated threshold, not a
//!   significance test: BLEU differences under one point on a few hundred validation sentences
//!   are usually not significant under paired bootstrap resampling (Koehn 2004).

use serde::{Deserialize, Serialize};

/// Steps averaged for the equal-step and equal-time losses.
pub const WINDOW: usize = 10;
/// BLEU points within which two arms count as equal in quality.
pub const DEFAULT_NOISE_BLEU: f64 = 1.0;

/// One step of an arm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepPoint {
    pub step: u64,
    pub loss: f64,
    pub step_ms: f64,
    /// Non-pad target tokens in the step's batch.
    pub tokens: f64,
    pub skipped: bool,
}

/// Non-pad target tokens of a step, from its record (`tokens_per_s` is tokens / step time).
pub fn step_tokens(tokens_per_s: f64, step_ms: f64) -> f64 {
    (tokens_per_s * step_ms / 1e3).round()
}

/// An arm's last validation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FinalValidation {
    pub step: u64,
    pub val_loss: f64,
    pub bleu: f64,
    pub chrf: f64,
}

/// How a peak memory figure was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemorySource {
    /// Peak resident set size of the process that ran the arm.
    Measured,
    /// The memory-admission estimate ([`crate::memory::estimate`]).
    Estimated,
}

/// What is known of one arm.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ArmRun {
    pub label: String,
    pub steps: Vec<StepPoint>,
    pub validation: Option<FinalValidation>,
    pub peak_memory: Option<(u64, MemorySource)>,
    /// The arm failed (its error), or is not finished (`None` and no steps yet).
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArmSummary {
    pub label: String,
    pub steps: u64,
    /// Summed step time, seconds.
    pub train_s: f64,
    pub tokens_per_s: Option<f64>,
    /// tokens/s over the first arm's (1.0 for the first arm).
    pub speedup: Option<f64>,
    pub loss_at_equal_steps: Option<f64>,
    pub loss_at_equal_time: Option<f64>,
    /// The step this arm had reached at the equal time.
    pub step_at_equal_time: Option<u64>,
    pub val_loss: Option<f64>,
    pub bleu: Option<f64>,
    pub chrf: Option<f64>,
    /// BLEU minus the first arm's BLEU.
    pub bleu_delta: Option<f64>,
    pub skipped_steps: u64,
    pub peak_memory_bytes: Option<u64>,
    pub peak_memory_source: Option<MemorySource>,
    pub error: Option<String>,
    pub verdict: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The last step every arm reached (the equal-steps comparison point).
    pub equal_step: Option<u64>,
    /// The summed step time every arm reached, seconds (the equal-time comparison point).
    pub equal_time_s: Option<f64>,
    pub window: usize,
    pub noise_bleu: f64,
    pub arms: Vec<ArmSummary>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Mean loss of the counted steps among the [`WINDOW`] steps ending at index `end`.
fn window_loss(steps: &[StepPoint], end: usize) -> Option<f64> {
    let lo = (end + 1).saturating_sub(WINDOW);
    let v: Vec<f64> = steps[lo..=end]
        .iter()
        .filter(|s| !s.skipped && s.loss.is_finite())
        .map(|s| s.loss)
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn train_s(steps: &[StepPoint]) -> f64 {
    steps.iter().map(|s| s.step_ms).sum::<f64>() / 1e3
}

fn tokens_per_s(steps: &[StepPoint]) -> Option<f64> {
    let t = train_s(steps);
    (t > 0.0).then(|| steps.iter().map(|s| s.tokens).sum::<f64>() / t)
}

/// Compare `arms` (the first is the baseline).
pub fn summarize(arms: &[ArmRun], noise_bleu: f64) -> Summary {
    let with_steps: Vec<&ArmRun> = arms.iter().filter(|a| !a.steps.is_empty()).collect();
    let equal_step = with_steps
        .iter()
        .map(|a| a.steps.last().map_or(0, |s| s.step))
        .min();
    let equal_time_s = with_steps
        .iter()
        .map(|a| train_s(&a.steps))
        .min_by(f64::total_cmp);
    let base_tps = arms.first().and_then(|a| tokens_per_s(&a.steps));
    let base_bleu = arms
        .first()
        .and_then(|a| a.validation)
        .and_then(|v| finite(v.bleu));
    let out = arms
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let tps = tokens_per_s(&a.steps);
            let speedup = match (tps, base_tps) {
                (Some(t), Some(b)) if b > 0.0 => Some(t / b),
                _ => None,
            };
            let at_step = equal_step.and_then(|n| {
                let end = a.steps.iter().rposition(|s| s.step <= n)?;
                window_loss(&a.steps, end)
            });
            let (at_time, step_at_time) = match equal_time_s {
                Some(t) if !a.steps.is_empty() => {
                    let mut cum = 0.0;
                    let mut end = None;
                    for (k, s) in a.steps.iter().enumerate() {
                        cum += s.step_ms / 1e3;
                        if cum <= t * (1.0 + 1e-9) {
                            end = Some(k);
                        } else {
                            break;
                        }
                    }
                    match end {
                        Some(e) => (window_loss(&a.steps, e), Some(a.steps[e].step)),
                        None => (None, None),
                    }
                }
                _ => (None, None),
            };
            let v = a.validation;
            let bleu = v.and_then(|v| finite(v.bleu));
            let bleu_delta = match (bleu, base_bleu) {
                (Some(b), Some(b0)) if i > 0 => Some(b - b0),
                (Some(_), Some(_)) => Some(0.0),
                _ => None,
            };
            let skipped = a.steps.iter().filter(|s| s.skipped).count() as u64;
            let mut s = ArmSummary {
                label: a.label.clone(),
                steps: a.steps.last().map_or(0, |s| s.step),
                train_s: train_s(&a.steps),
                tokens_per_s: tps,
                speedup,
                loss_at_equal_steps: at_step,
                loss_at_equal_time: at_time,
                step_at_equal_time: step_at_time,
                val_loss: v.and_then(|v| finite(v.val_loss)),
                bleu,
                chrf: v.and_then(|v| finite(v.chrf)),
                bleu_delta,
                skipped_steps: skipped,
                peak_memory_bytes: a.peak_memory.map(|m| m.0),
                peak_memory_source: a.peak_memory.map(|m| m.1),
                error: a.error.clone(),
                verdict: String::new(),
            };
            s.verdict = verdict(&s, i == 0, noise_bleu);
            s
        })
        .collect();
    Summary {
        equal_step,
        equal_time_s,
        window: WINDOW,
        noise_bleu,
        arms: out,
    }
}

/// `f16: 1.52x faster, BLEU -0.3, within noise (|ΔBLEU| <= 1.0)`.
pub fn verdict(s: &ArmSummary, baseline: bool, noise_bleu: f64) -> String {
    if let Some(e) = &s.error {
        return format!("{}: failed ({e})", s.label);
    }
    if s.steps == 0 {
        return format!("{}: not run yet", s.label);
    }
    let skipped = if s.skipped_steps > 0 {
        format!(", {} skipped steps", s.skipped_steps)
    } else {
        String::new()
    };
    if baseline {
        let bleu = s
            .bleu
            .map_or("no validation yet".into(), |b| format!("BLEU {b:.1}"));
        let tps = s
            .tokens_per_s
            .map_or("–".into(), |t| format!("{t:.0} tokens/s"));
        return format!("{}: baseline, {tps}, {bleu}{skipped}", s.label);
    }
    let speed = match s.speedup {
        Some(x) if x >= 1.0 => format!("{x:.2}x faster"),
        Some(x) if x > 0.0 => format!("{:.2}x slower", 1.0 / x),
        _ => "speed unknown".into(),
    };
    let quality = match s.bleu_delta {
        None => "BLEU not comparable yet".to_string(),
        Some(d) => {
            let judged = if d.abs() <= noise_bleu {
                "within noise"
            } else if d > 0.0 {
                "better beyond noise"
            } else {
                "worse beyond noise"
            };
            format!("BLEU {d:+.1}, {judged} (|ΔBLEU| <= {noise_bleu})")
        }
    };
    format!("{}: {speed}, {quality}{skipped}", s.label)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` steps of `ms` each with `tokens` tokens, losses from `loss(step)`.
    fn arm(label: &str, n: u64, ms: f64, tokens: f64, loss: impl Fn(u64) -> f64) -> ArmRun {
        ArmRun {
            label: label.into(),
            steps: (1..=n)
                .map(|s| StepPoint {
                    step: s,
                    loss: loss(s),
                    step_ms: ms,
                    tokens,
                    skipped: false,
                })
                .collect(),
            validation: None,
            peak_memory: None,
            error: None,
        }
    }

    fn val(bleu: f64) -> Option<FinalValidation> {
        Some(FinalValidation {
            step: 0,
            val_loss: 2.0,
            bleu,
            chrf: 30.0,
        })
    }

    #[test]
    fn tokens_per_second_and_speedup_come_from_summed_step_time() {
        // 100 tokens per 50 ms step = 2000 tokens/s; 100 per 25 ms = 4000
        let s = summarize(
            &[
                arm("fp32", 20, 50.0, 100.0, |_| 1.0),
                arm("f16", 40, 25.0, 100.0, |_| 1.0),
            ],
            1.0,
        );
        assert!((s.arms[0].tokens_per_s.unwrap() - 2000.0).abs() < 1e-9);
        assert!((s.arms[1].tokens_per_s.unwrap() - 4000.0).abs() < 1e-9);
        assert_eq!(s.arms[0].speedup, Some(1.0));
        assert!((s.arms[1].speedup.unwrap() - 2.0).abs() < 1e-12);
        assert!((s.arms[0].train_s - 1.0).abs() < 1e-12);
    }

    #[test]
    fn loss_at_equal_steps_averages_the_window_up_to_the_last_common_step() {
        // arm a reaches step 20, arm b step 30: the common step is 20, and each arm's figure is
        // the mean of its losses at steps 11..=20, whatever it did later
        let s = summarize(
            &[
                arm("a", 20, 10.0, 1.0, |k| k as f64),
                arm("b", 30, 10.0, 1.0, |k| 2.0 * k as f64),
            ],
            1.0,
        );
        assert_eq!(s.equal_step, Some(20));
        assert_eq!(s.arms[0].loss_at_equal_steps, Some(15.5));
        assert_eq!(s.arms[1].loss_at_equal_steps, Some(31.0));
    }

    #[test]
    fn loss_at_equal_time_reads_each_arm_where_the_slowest_clock_stopped() {
        // a: 10 steps of 100 ms (1 s in all); b: 40 steps of 25 ms: at 1 s b is at step 40
        let s = summarize(
            &[
                arm("a", 10, 100.0, 1.0, |k| 10.0 - k as f64 * 0.1),
                arm("b", 60, 25.0, 1.0, |k| 100.0 - k as f64),
            ],
            1.0,
        );
        assert!((s.equal_time_s.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(s.arms[0].step_at_equal_time, Some(10));
        assert_eq!(s.arms[1].step_at_equal_time, Some(40));
        // mean of 100 - k for k in 31..=40
        assert!((s.arms[1].loss_at_equal_time.unwrap() - 64.5).abs() < 1e-9);
    }

    #[test]
    fn skipped_steps_are_counted_and_left_out_of_the_loss_means() {
        let mut a = arm("f16", 10, 10.0, 1.0, |_| 1.0);
        a.steps[9].skipped = true;
        a.steps[9].loss = f64::INFINITY;
        a.steps[8].skipped = true;
        a.steps[8].loss = 50.0;
        let s = summarize(&[a], 1.0);
        assert_eq!(s.arms[0].skipped_steps, 2);
        assert_eq!(s.arms[0].loss_at_equal_steps, Some(1.0));
    }

    #[test]
    fn the_verdict_names_speed_bleu_change_and_whether_it_is_within_noise() {
        let mut a = arm("fp32", 10, 30.0, 100.0, |_| 1.0);
        a.validation = val(20.0);
        let mut b = arm("f16", 10, 20.0, 100.0, |_| 1.0);
        b.validation = val(19.7);
        let mut c = arm("bf16", 10, 60.0, 100.0, |_| 1.0);
        c.validation = val(17.5);
        let s = summarize(&[a, b, c], 1.0);
        assert!(
            s.arms[0].verdict.starts_with("fp32: baseline"),
            "{}",
            s.arms[0].verdict
        );
        assert_eq!(
            s.arms[1].verdict,
            "f16: 1.50x faster, BLEU -0.3, within noise (|ΔBLEU| <= 1)"
        );
        assert_eq!(
            s.arms[2].verdict,
            "bf16: 2.00x slower, BLEU -2.5, worse beyond noise (|ΔBLEU| <= 1)"
        );
    }

    #[test]
    fn a_failed_or_unstarted_arm_says_so_and_the_others_still_compare() {
        let mut failed = arm("f16", 3, 10.0, 1.0, |_| 1.0);
        failed.error = Some("training diverged".into());
        let waiting = ArmRun {
            label: "bf16".into(),
            ..ArmRun::default()
        };
        let s = summarize(&[arm("fp32", 5, 10.0, 1.0, |_| 1.0), failed, waiting], 1.0);
        assert_eq!(s.arms[1].verdict, "f16: failed (training diverged)");
        assert_eq!(s.arms[2].verdict, "bf16: not run yet");
        assert_eq!(s.equal_step, Some(3));
    }
}
