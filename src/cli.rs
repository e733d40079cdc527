//! Command-line front ends for the library: `ampserve train` with a tqdm-style progress bar.

pub mod experiment;

use crate::config::{Precision, TrainSpec};
use crate::train::{self, RunOptions, TrainEvent};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Training spec (TOML), e.g. configs/tiny.toml
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override train.precision: fp32 | f16 | bf16 | auto (bf16 on a CPU with AVX512-BF16, else fp32)
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Resume the run in DIR from its latest valid checkpoint (uses DIR/spec.json unless --config is given)
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Run directory (default runs/<name>-<time>)
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Override train.epochs
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Override train.max_steps
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Override train.max_time_s (a training time budget in seconds)
    #[arg(long)]
    pub max_time_s: Option<f64>,
    /// Device: cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print one JSON event per line instead of the progress bar
    #[arg(long)]
    pub json: bool,
    /// Folder the config's relative corpus paths are looked up in first (repeatable), e.g.
    /// `../shared/data`; the bundled `data/` is tried last
    #[arg(long = "data-root", value_name = "DIR")]
    pub data_roots: Vec<PathBuf>,
}

/// `cpu` or `cuda:N` (also `cuda`/`gpu` for `cuda:0`), opened. The same parser as the server's
/// `--devices` ([`crate::worker::DeviceSpec`]): a clear error when the build has no `cuda`
/// feature or the GPU cannot be opened.
pub fn parse_device(s: &str) -> anyhow::Result<candle_core::Device> {
    let spec: crate::worker::DeviceSpec = s.parse()?;
    Ok(spec.open()?)
}

fn fmt_hms(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

/// The write-up's tqdm line: `epoch 00: 37%|███   | 512/1380 [01:02<01:45, 8.2it/s, loss=4.37, scale=65536]`
pub fn progress_line(
    epoch: u64,
    done: u64,
    total: u64,
    elapsed: f64,
    it_s: f64,
    loss: f64,
    scale: f64,
) -> String {
    let frac = if total > 0 {
        done as f64 / total as f64
    } else {
        0.0
    };
    let width = 20usize;
    let filled = ((frac * width as f64).round() as usize).min(width);
    let bar: String = "█".repeat(filled) + &" ".repeat(width - filled);
    let eta = if it_s > 0.0 {
        (total.saturating_sub(done)) as f64 / it_s
    } else {
        0.0
    };
    format!(
        "epoch {epoch:02}: {:3.0}%|{bar}| {done}/{total} [{}<{}, {it_s:.2}it/s, loss={loss:.3}, scale={scale}]",
        frac * 100.0,
        fmt_hms(elapsed),
        fmt_hms(eta),
    )
}

pub fn train(args: TrainArgs, cancel: Arc<AtomicBool>) -> anyhow::Result<()> {
    let mut spec = match (&args.config, &args.resume) {
        (Some(c), _) => TrainSpec::from_toml_file_in(c, &args.data_roots)?,
        (None, Some(dir)) => {
            let text = std::fs::read_to_string(dir.join("spec.json"))
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("spec.json").display()))?;
            serde_json::from_str(&text)?
        }
        (None, None) => {
            anyhow::bail!("give --config FILE (e.g. configs/tiny.toml) or --resume DIR")
        }
    };
    if let Some(p) = args.precision {
        spec.train.precision = p;
    }
    if let Some(e) = args.epochs {
        spec.train.epochs = e;
    }
    if let Some(m) = args.max_steps {
        spec.train.max_steps = m;
    }
    if let Some(t) = args.max_time_s {
        spec.train.max_time_s = t;
    }
    spec.validate()?;
    let out = match (&args.resume, &args.out) {
        (Some(d), _) => d.clone(),
        (None, Some(o)) => o.clone(),
        (None, None) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            PathBuf::from("runs").join(format!("{}-{}-{t}", spec.name, spec.train.precision))
        }
    };
    let opts = RunOptions {
        out_dir: out,
        device: parse_device(&args.device)?,
        resume: args.resume.is_some(),
        barrier: None,
    };
    let json = args.json;
    let mut total = 0u64;
    let mut first_step = 0u64;
    let start = Instant::now();
    let mut last_print = Instant::now() - std::time::Duration::from_secs(1);
    let mut sink = |ev: TrainEvent| {
        if json {
            println!("{}", serde_json::to_string(&ev).unwrap_or_default());
            return;
        }
        let mut err = std::io::stderr();
        match &ev {
            TrainEvent::Started(s) => {
                total = s.total_steps;
                first_step = s.resumed_from_step;
                let _ = writeln!(
                    err,
                    "run {} | {} | {} params | vocab {}/{} | {} train pairs ({} dropped as too long, {} malformed lines) | {} valid{}",
                    s.run_dir.display(),
                    s.device,
                    s.parameters,
                    s.src_vocab,
                    s.tgt_vocab,
                    s.train_pairs,
                    s.dropped_long,
                    s.malformed_lines,
                    s.valid_pairs,
                    if s.resumed_from_step > 0 { format!(" | resumed at step {}", s.resumed_from_step) } else { String::new() }
                );
            }
            TrainEvent::Step(r) if last_print.elapsed().as_millis() >= 200 || r.step == total => {
                last_print = Instant::now();
                let el = start.elapsed().as_secs_f64();
                let it_s = (r.step - first_step) as f64 / el.max(1e-9);
                let _ = write!(
                    err,
                    "\r{}",
                    progress_line(r.epoch, r.step, total, el, it_s, r.loss, r.loss_scale)
                );
            }
            TrainEvent::Validation(v) => {
                let _ = writeln!(
                    err,
                    "\nvalid @ step {}: loss {:.3} | BLEU {:.2} | chrF {:.2} | CER {:.3} | WER {:.3} ({} sentences)",
                    v.step, v.val_loss, v.bleu, v.chrf, v.cer, v.wer, v.sentences
                );
                for s in &v.samples {
                    let _ = writeln!(
                        err,
                        "  src: {}\n  ref: {}\n  hyp: {}",
                        s.source, s.reference, s.hypothesis
                    );
                }
            }
            TrainEvent::Checkpoint(c) => {
                let _ = writeln!(
                    err,
                    "\ncheckpoint {} ({:.1} MB){}",
                    c.path.display(),
                    c.size_bytes as f64 / 1e6,
                    if c.is_best { " [best]" } else { "" }
                );
            }
            TrainEvent::Overflow(o) => {
                let names: Vec<&str> = o.tensors.iter().map(|t| t.name.as_str()).collect();
                let _ = writeln!(
                    err,
                    "\noverflow @ step {} (scale {}): {}",
                    o.step,
                    o.loss_scale,
                    names.join(", ")
                );
            }
            _ => {}
        }
    };
    let s = train::run(&spec, &opts, &mut sink, &cancel)?;
    if !json {
        eprintln!(
            "\n{} after {} steps ({} epochs) in {}: final loss {:.4}, loss scale {}, {} skipped steps, {:.0} tok/s, best BLEU {}",
            if s.cancelled { "cancelled" } else { "done" },
            s.steps,
            s.epochs_completed,
            fmt_hms(s.wall_s),
            s.final_loss,
            s.final_loss_scale,
            s.skipped_steps,
            s.tokens_per_s,
            s.best_bleu.map_or("-".into(), |b| format!("{b:.2}")),
        );
        if let Some(b) = &s.best_checkpoint {
            eprintln!("best checkpoint: {}", b.display());
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The run directory (holds `checkpoints/` and `tokenizers/`)
    #[arg(long, value_name = "DIR")]
    pub run: PathBuf,
    /// best | latest | <step>
    #[arg(long, default_value = "best")]
    pub checkpoint: String,
    /// Output directory (must not exist); default <run>/model-<checkpoint>
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Model name in the manifest (default: the run directory's name @ step)
    #[arg(long)]
    pub name: Option<String>,
    /// Average the weights of the last N checkpoints up to --checkpoint (default: the run's
    /// checkpoint.average_last)
    #[arg(long, value_name = "N")]
    pub average_last: Option<usize>,
}

/// `ampserve export`: write an f16 model directory and print its manifest.
pub fn export(a: ExportArgs) -> anyhow::Result<()> {
    use crate::infer::{export, CheckpointChoice};
    let choice: CheckpointChoice = a.checkpoint.parse().map_err(anyhow::Error::from)?;
    let out = a
        .out
        .unwrap_or_else(|| a.run.join(format!("model-{choice}")));
    let (meta, _) = export::find_checkpoint(&a.run, choice)?;
    let name = a.name.unwrap_or_else(|| {
        let run = a
            .run
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model");
        format!("{run}@{}", meta.step)
    });
    let m = export::export_averaged(&a.run, choice, &out, &name, None, a.average_last)?;
    if !m.averaged_steps.is_empty() {
        eprintln!("averaged the checkpoints of steps {:?}", m.averaged_steps);
    }
    eprintln!(
        "exported step {} ({} parameters, {:.1} MB in f16) to {}",
        m.step,
        m.params,
        m.total_bytes() as f64 / 1e6,
        out.display()
    );
    println!("{}", serde_json::to_string_pretty(&m)?);
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct TranslateArgs {
    /// An exported model directory (from `ampserve export` or the server's `models/`); with
    /// `--server`, a model id from `ampserve models list` (default: the newest)
    #[arg(long, value_name = "DIR|ID", required_unless_present = "server")]
    pub model: Option<PathBuf>,
    /// Translate on this running server (`POST /api/translate`; token from AMPSERVE_API_TOKEN)
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Sentences to translate; none: read one sentence per line from stdin
    pub text: Vec<String>,
    /// Beam size (1 = greedy)
    #[arg(long, default_value_t = 1)]
    pub beam: usize,
    /// Length normalisation exponent for beam search
    #[arg(long, default_value_t = 0.6)]
    pub alpha: f64,
    /// Longest output in tokens (default 1.5 * source words + 10)
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Sentences decoded together
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Device: cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: fp32 | f16 | bf16 (default: f32 on CPU, f16 on CUDA)
    #[arg(long)]
    pub compute: Option<Precision>,
    /// Print one JSON object per sentence (text, tokens, score)
    #[arg(long)]
    pub json: bool,
}

/// `ampserve translate`: one output line per input line (blank in, blank out), in order.
pub fn translate(a: TranslateArgs) -> anyhow::Result<()> {
    use crate::infer::DecodeOptions;
    use std::io::BufRead;
    if !(1..=16).contains(&a.beam) {
        anyhow::bail!("--beam must be in 1..=16");
    }
    let lines: Vec<String> = if a.text.is_empty() {
        std::io::stdin().lock().lines().collect::<Result<_, _>>()?
    } else {
        a.text.clone()
    };
    if let Some(server) = &a.server {
        let model = a.model.as_ref().map(|m| m.to_string_lossy().into_owned());
        return crate::client::translate_remote(
            server,
            model.as_deref(),
            &lines,
            a.beam,
            a.max_length,
            a.batch,
            a.json,
        );
    }
    let dev = parse_device(&a.device)?;
    let model = a
        .model
        .as_ref()
        .expect("clap requires --model without --server");
    // an exported ampserve model or an imported Marian one, as its manifest says
    let t = crate::infer::engine::load(model, &dev, a.compute)?;
    let enc = t.source_encoder();
    let opts = DecodeOptions {
        beam_size: a.beam,
        alpha: a.alpha,
        ..DecodeOptions::default()
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for chunk in lines.chunks(a.batch.max(1)) {
        let idx: Vec<usize> = (0..chunk.len())
            .filter(|&i| !enc.encode(&chunk[i]).is_empty())
            .collect();
        let texts: Vec<&str> = idx.iter().map(|&i| chunk[i].as_str()).collect();
        let res = t.translate_texts(&texts, &opts, a.max_length)?;
        let mut results: Vec<Option<crate::infer::Translation>> = vec![None; chunk.len()];
        for (&i, tr) in idx.iter().zip(res) {
            results[i] = Some(tr);
        }
        for (src, tr) in chunk.iter().zip(results) {
            match tr {
                Some(tr) if a.json => writeln!(
                    out,
                    "{}",
                    serde_json::json!({"source": src, "text": tr.text,
                        "source_tokens": tr.source_tokens, "tokens": tr.tokens, "score": tr.score})
                )?,
                Some(tr) => writeln!(out, "{}", tr.text)?,
                None => writeln!(out)?,
            }
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// An exported model directory
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Test corpus: `source<TAB>reference` lines
    #[arg(long, value_name = "FILE")]
    pub tsv: PathBuf,
    /// Beam size (1 = greedy)
    #[arg(long, default_value_t = 1)]
    pub beam: usize,
    /// Sentences decoded together
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Write the hypotheses here, one per line (for sacreBLEU or score.py)
    #[arg(long, value_name = "FILE")]
    pub hyps: Option<PathBuf>,
    /// Device: cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: fp32 | f16 | bf16 (default: f32 on CPU, f16 on CUDA)
    #[arg(long)]
    pub compute: Option<Precision>,
}

/// `ampserve eval`: print the report as JSON (and a one-line summary on stderr).
pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    use crate::infer::evaluate_tsv;
    if !(1..=16).contains(&a.beam) {
        anyhow::bail!("--beam must be in 1..=16");
    }
    let dev = parse_device(&a.device)?;
    let t = crate::infer::engine::load(&a.model, &dev, a.compute)?;
    let (r, hyps) = evaluate_tsv(t.as_ref(), &a.tsv, a.beam, a.batch)?;
    if let Some(p) = &a.hyps {
        let mut text = hyps.join("\n");
        text.push('\n');
        std::fs::write(p, text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    }
    eprintln!(
        "{}: BLEU {:.2} | chrF {:.2} | {} sentences, beam {}",
        r.corpus, r.bleu, r.chrf, r.sentences, r.beam_size
    );
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parse_device_names_the_problem() {
        let cpu = super::parse_device("cpu").unwrap();
        assert!(cpu.is_cpu());
        assert_eq!(crate::bench::device_label(&cpu), "cpu");
        let e = super::parse_device("tpu:0").unwrap_err().to_string();
        assert!(e.contains("unknown device `tpu:0`"), "{e}");
        if !cfg!(feature = "cuda") {
            for s in ["cuda:0", "cuda", "gpu"] {
                let e = super::parse_device(s).unwrap_err().to_string();
                assert!(e.contains("built without the `cuda` feature"), "{s}: {e}");
                assert!(e.contains("scripts/build-cuda.sh"), "{s}: {e}");
            }
        }
    }
}
