//! Run an experiment's arms in this process, one after another (fair timing on a CPU: no arm
//! competes with another for the cores), each in its own run directory, and collect what the
//! summary needs. Used by `ampserve experiment`; the server runs arms as jobs instead.

use super::summary::{step_tokens, ArmRun, FinalValidation, MemorySource, StepPoint};
use super::{arm_spec, Arm, Budget};
use crate::config::{SpecError, TrainSpec};
use crate::train::{self, RunOptions, TrainEvent};
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// Reset the process's peak resident size (Linux: `5` to `/proc/self/clear_refs`). False when
/// it cannot be reset, so a later peak would include earlier arms.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A `/proc/self/status` field in bytes (`VmHWM`: peak resident size, `VmRSS`: now).
fn status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident size of this process (`VmHWM`), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// The arm's peak memory. Measured (peak RSS since the arm started) when that peak rose above
/// what the process already held when the arm began: the allocator keeps pages earlier arms
/// freed, so a peak that did not rise says only "at most this much". Then, and when the peak
/// cannot be reset, the admission estimate stands in ([`crate::memory::estimate`]).
fn arm_peak(
    spec: &TrainSpec,
    reset: bool,
    rss_at_start: Option<u64>,
) -> Option<(u64, MemorySource)> {
    let peak = peak_rss_bytes();
    match (reset, peak, rss_at_start) {
        (true, Some(p), Some(start)) if p > start + (8 << 20) => Some((p, MemorySource::Measured)),
        _ => crate::memory::scan_corpus(spec).ok().map(|f| {
            (
                crate::memory::estimate(spec, f).total_bytes(),
                MemorySource::Estimated,
            )
        }),
    }
}

/// One arm's run: its spec, directory and figures.
#[derive(Debug, Clone)]
pub struct LocalArm {
    pub spec: TrainSpec,
    pub run_dir: PathBuf,
    pub run: ArmRun,
}

/// Validate every arm's spec first (nothing runs when one is invalid), then run them in order
/// under `out_dir/<index>-<label>`. An arm that fails is recorded with its error and the next
/// one runs. `on_event(arm index, event)` sees every event.
pub fn run_arms(
    base: &TrainSpec,
    arms: &[Arm],
    budget: &Budget,
    out_dir: &Path,
    device: &Device,
    on_event: &mut dyn FnMut(usize, &TrainEvent),
    cancel: &AtomicBool,
) -> Result<Vec<LocalArm>, SpecError> {
    let specs = arms
        .iter()
        .enumerate()
        .map(|(i, a)| arm_spec(base, a, i, budget))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(arms.len());
    for (i, (arm, spec)) in arms.iter().zip(specs).enumerate() {
        let run_dir = out_dir.join(format!("{i}-{}", arm.label));
        let reset = reset_peak_rss();
        let rss_at_start = status_bytes("VmRSS:");
        let mut steps = Vec::new();
        let mut validation = None;
        let opts = RunOptions {
            out_dir: run_dir.clone(),
            device: device.clone(),
            resume: false,
            barrier: None,
        };
        let result = train::run(
            &spec,
            &opts,
            &mut |ev| {
                match &ev {
                    TrainEvent::Step(r) => steps.push(StepPoint {
                        step: r.step,
                        loss: r.loss,
                        step_ms: r.step_ms,
                        tokens: step_tokens(r.tokens_per_s, r.step_ms),
                        skipped: r.skipped,
                    }),
                    TrainEvent::Validation(v) => {
                        validation = Some(FinalValidation {
                            step: v.step,
                            val_loss: v.val_loss,
                            bleu: v.bleu,
                            chrf: v.chrf,
                        })
                    }
                    _ => {}
                }
                on_event(i, &ev);
            },
            cancel,
        );
        let peak = arm_peak(&spec, reset, rss_at_start);
        out.push(LocalArm {
            spec,
            run_dir,
            run: ArmRun {
                label: arm.label.clone(),
                steps,
                validation,
                peak_memory: peak,
                error: result.err().map(|e| e.to_string()),
            },
        });
    }
    Ok(out)
}
