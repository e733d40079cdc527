//! `ampserve experiment`: run a precision experiment's arms locally, one after another (no
//! server), and print the comparison table and verdicts.

use super::parse_device;
use crate::config::TrainSpec;
use crate::experiment::summary::{self, MemorySource, Summary};
use crate::experiment::{local, parse_arms, Budget};
use crate::memory::human;
use crate::train::TrainEvent;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct ExperimentArgs {
    /// Training spec (TOML) every arm starts from, e.g. configs/tiny.toml
    #[arg(long)]
    pub config: PathBuf,
    /// Arms: precision names (`fp32,f16,bf16`), or a JSON array of precision names and override
    /// objects (`[{"label": "f16-hot", "train": {"precision": "f16", "lr": 0.001}}]`)
    #[arg(long, default_value = "fp32,f16,bf16")]
    pub arms: String,
    /// Step budget of every arm (0: none)
    #[arg(long, default_value_t = 0)]
    pub max_steps: usize,
    /// Training-time budget of every arm, seconds (0: none)
    #[arg(long, default_value_t = 0.0)]
    pub max_time_s: f64,
    /// BLEU points within which an arm counts as equal in quality to the first
    #[arg(long, default_value_t = summary::DEFAULT_NOISE_BLEU)]
    pub noise_bleu: f64,
    /// Folder for the arms' run directories (default runs/experiment-<name>-<time>)
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Device: cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the summary as JSON instead of the table
    #[arg(long)]
    pub json: bool,
    /// Folder the config's relative corpus paths are looked up in first (repeatable)
    #[arg(long = "data-root", value_name = "DIR")]
    pub data_roots: Vec<PathBuf>,
}

fn arms_value(s: &str) -> anyhow::Result<serde_json::Value> {
    let t = s.trim();
    if t.starts_with('[') {
        return Ok(serde_json::from_str(t)?);
    }
    Ok(serde_json::Value::Array(
        t.split(',')
            .map(|a| serde_json::Value::String(a.trim().to_string()))
            .collect(),
    ))
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("–".into(), |v| format!("{v:.digits$}"))
}

/// The comparison as a plain-text table followed by one verdict line per arm.
pub fn table(s: &Summary) -> String {
    let step_h = s
        .equal_step
        .map_or("loss@step".into(), |n| format!("loss@{n}"));
    let time_h = s
        .equal_time_s
        .map_or("loss@time".into(), |t| format!("loss@{t:.0}s"));
    let head = [
        "arm", "steps", "train s", "tokens/s", "speedup", &step_h, &time_h, "val loss", "BLEU",
        "chrF", "skipped", "peak mem",
    ];
    let rows: Vec<Vec<String>> = s
        .arms
        .iter()
        .map(|a| {
            vec![
                a.label.clone(),
                a.steps.to_string(),
                format!("{:.1}", a.train_s),
                opt(a.tokens_per_s, 0),
                a.speedup.map_or("–".into(), |x| format!("{x:.2}x")),
                opt(a.loss_at_equal_steps, 3),
                match (a.loss_at_equal_time, a.step_at_equal_time) {
                    (Some(l), Some(st)) => format!("{l:.3} (step {st})"),
                    _ => "–".into(),
                },
                opt(a.val_loss, 3),
                opt(a.bleu, 2),
                opt(a.chrf, 1),
                a.skipped_steps.to_string(),
                match (a.peak_memory_bytes, a.peak_memory_source) {
                    (Some(b), Some(MemorySource::Estimated)) => format!("~{} est.", human(b)),
                    (Some(b), _) => human(b),
                    _ => "–".into(),
                },
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..head.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([head[c].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (v, w))| {
                if c == 0 {
                    format!("{v:<w$}")
                } else {
                    format!("{v:>w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = line(head.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out.push('\n');
    for a in &s.arms {
        out.push_str(&a.verdict);
        out.push('\n');
    }
    out.push_str(&format!(
        "\nloss@step / loss@time: mean training loss over the {} steps up to the last step every \
         arm reached / up to the summed step time every arm reached; tokens/s over summed step \
         time; peak mem: peak RSS while the arm ran (est.: the admission estimate, where that peak \
         did not rise above what earlier arms left allocated); noise: |ΔBLEU| <= {} (a stated \
         threshold, not a significance test)\n",
        s.window, s.noise_bleu
    ));
    out
}

pub fn experiment(args: ExperimentArgs, cancel: std::sync::Arc<AtomicBool>) -> anyhow::Result<()> {
    let base = TrainSpec::from_toml_file_in(&args.config, &args.data_roots)?;
    base.validate()?;
    let arms = parse_arms(&arms_value(&args.arms)?)?;
    let budget = Budget::new(args.max_steps, args.max_time_s)?;
    let out = args.out.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from("runs").join(format!("experiment-{}-{t}", base.name))
    });
    let device = parse_device(&args.device)?;
    let n = arms.len();
    let labels: Vec<String> = arms.iter().map(|a| a.label.clone()).collect();
    let mut last_print = Instant::now();
    let mut arm_start = Instant::now();
    let mut on_event = |i: usize, ev: &TrainEvent| match ev {
        TrainEvent::Started(s) => {
            arm_start = Instant::now();
            eprintln!(
                "arm {}/{n} {}: {} parameters on {}, run dir {}",
                i + 1,
                labels[i],
                s.parameters,
                s.device,
                s.run_dir.display()
            );
        }
        TrainEvent::Step(r) if last_print.elapsed().as_secs_f64() >= 10.0 => {
            last_print = Instant::now();
            eprintln!(
                "arm {}/{n} {}: step {} loss {:.3} scale {} [{:.0}s]",
                i + 1,
                labels[i],
                r.step,
                r.loss,
                r.loss_scale,
                arm_start.elapsed().as_secs_f64()
            );
        }
        TrainEvent::Finished(s) => eprintln!(
            "arm {}/{n} {}: {} steps in {:.1}s{}",
            i + 1,
            labels[i],
            s.steps,
            s.wall_s,
            s.stopped_by
                .as_deref()
                .map(|b| format!(" (stopped by {b})"))
                .unwrap_or_default()
        ),
        _ => {}
    };
    let ran = local::run_arms(&base, &arms, &budget, &out, &device, &mut on_event, &cancel)?;
    let runs: Vec<_> = ran.into_iter().map(|a| a.run).collect();
    let s = summary::summarize(&runs, args.noise_bleu);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", table(&s));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::summary::{summarize, ArmRun, StepPoint};

    #[test]
    fn the_table_has_a_row_and_a_verdict_per_arm() {
        let arm = |label: &str, ms: f64| ArmRun {
            label: label.into(),
            steps: (1..=5)
                .map(|s| StepPoint {
                    step: s,
                    loss: 3.0,
                    step_ms: ms,
                    tokens: 100.0,
                    skipped: false,
                })
                .collect(),
            ..ArmRun::default()
        };
        let t = table(&summarize(&[arm("fp32", 20.0), arm("f16", 10.0)], 1.0));
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("arm") && lines[0].contains("loss@5"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("fp32") && lines[1].contains("5000"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("f16") && lines[2].contains("2.00x"),
            "{t}"
        );
        assert!(
            t.contains("f16: 2.00x faster, BLEU not comparable yet"),
            "{t}"
        );
    }
}
