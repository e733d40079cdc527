//! Precision experiments run locally (`experiment::local`, what `ampserve experiment` does) on
//! the bundled Tatoeba en-it corpus with a tiny model: the arms share initial weights and data
//! order, so what is exactly equal between them is equal, and the summary reports every arm.

mod tiny;
use tiny::tiny_spec;

use ampserve::experiment::{local, parse_arms, summary, Budget};
use candle_core::Device;
use serde_json::json;
use std::sync::atomic::AtomicBool;

fn run(arms: serde_json::Value, steps: usize) -> Vec<local::LocalArm> {
    let dir = tempfile::tempdir().unwrap();
    let mut base = tiny_spec("exp");
    base.train.epochs = 1000;
    base.train.valid_max_sentences = 16;
    base.checkpoint.every_steps = 0;
    let arms = parse_arms(&arms).unwrap();
    local::run_arms(
        &base,
        &arms,
        &Budget::new(steps, 0.0).unwrap(),
        dir.path(),
        &Device::Cpu,
        &mut |_, _| {},
        &AtomicBool::new(false),
    )
    .unwrap()
}

#[test]
fn arms_share_the_data_order_and_initial_weights_and_differ_only_in_their_overrides() {
    let arms = run(
        json!(["fp32", {"label": "fp32-hot", "train": {"lr": 0.05}}, "f16"]),
        4,
    );
    assert_eq!(arms.len(), 3);
    for a in &arms {
        assert_eq!(a.run.error, None, "{}", a.run.label);
        assert_eq!(a.run.steps.len(), 4, "{}", a.run.label);
    }
    // identical data order: every step's batch has the same number of target tokens
    let tokens = |i: usize| -> Vec<f64> { arms[i].run.steps.iter().map(|s| s.tokens).collect() };
    assert!(tokens(0).iter().all(|t| *t > 0.0));
    assert_eq!(tokens(0), tokens(1));
    assert_eq!(tokens(0), tokens(2));
    let loss = |i: usize, k: usize| arms[i].run.steps[k].loss;
    // step 1 is computed before any update: same weights, batch and dropout give the same loss
    // exactly in fp32, whatever the learning rate; the update shows from step 2 on
    assert_eq!(loss(0, 0), loss(1, 0));
    assert_ne!(loss(0, 1), loss(1, 1));
    // f16 runs the matmuls in half precision: the same first-step loss up to f16 rounding
    let rel = (loss(0, 0) - loss(2, 0)).abs() / loss(0, 0);
    assert!(rel < 1e-2, "fp32 {} vs f16 {}", loss(0, 0), loss(2, 0));
    assert_eq!(
        arms[2].spec.train.precision,
        ampserve::config::Precision::F16
    );
    assert_eq!(arms[2].spec.name, "exp-f16");
}

#[test]
fn the_summary_of_an_fp32_and_f16_experiment_reports_both_arms() {
    let arms = run(json!(["fp32", "f16"]), 3);
    let runs: Vec<_> = arms.into_iter().map(|a| a.run).collect();
    let s = summary::summarize(&runs, summary::DEFAULT_NOISE_BLEU);
    assert_eq!(s.equal_step, Some(3));
    assert!(s.equal_time_s.unwrap() > 0.0);
    assert_eq!(s.arms[0].speedup, Some(1.0));
    for a in &s.arms {
        assert!(a.tokens_per_s.unwrap() > 0.0, "{a:?}");
        assert!(a.loss_at_equal_steps.unwrap().is_finite(), "{a:?}");
        // an arm whose first step alone outlasted another arm's whole run has no loss at
        // equal time; every other arm has one
        assert_eq!(
            a.loss_at_equal_time.is_some(),
            a.step_at_equal_time.is_some(),
            "{a:?}"
        );
        assert!(a.loss_at_equal_time.is_none_or(f64::is_finite), "{a:?}");
        assert!(
            a.bleu.is_some() && a.chrf.is_some() && a.val_loss.is_some(),
            "{a:?}"
        );
        assert!(a.peak_memory_bytes.unwrap() > 1 << 20, "{a:?}");
        assert!(
            a.verdict.starts_with(&format!("{}: ", a.label)),
            "{}",
            a.verdict
        );
    }
    let quickest = s
        .arms
        .iter()
        .min_by(|a, b| a.train_s.total_cmp(&b.train_s))
        .unwrap();
    assert_eq!(quickest.step_at_equal_time, Some(3), "{quickest:?}");
    assert!(s.arms[1].speedup.unwrap() > 0.0);
    assert!(s.arms[1].verdict.contains("BLEU"), "{}", s.arms[1].verdict);
}
