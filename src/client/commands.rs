//! The client subcommands: argument types and what each prints.

use super::sse::SseParser;
use super::ApiClient;
use crate::cli::progress_line;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::time::Instant;

/// Where the server is; the token comes from `AMPSERVE_API_TOKEN`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// The server's base URL
    #[arg(long, env = "AMPSERVE_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
}

impl ServerArgs {
    pub fn client(&self) -> ApiClient {
        ApiClient::new(&self.server, std::env::var("AMPSERVE_API_TOKEN").ok())
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum JobsCmd {
    /// Submit a training job: a preset plus overrides; prints the new job's id
    Submit(SubmitArgs),
    /// List jobs, newest first
    List {
        /// Only jobs with this status (queued, running, succeeded, failed, cancelled)
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print the API's JSON instead of a table
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print one job as JSON (status, progress, metrics, spec)
    Show {
        id: i64,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Follow a job's live events with a progress line until it ends (exit 1 if it fails)
    Watch {
        id: i64,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Cancel a queued or running job (it keeps a checkpoint)
    Cancel {
        id: i64,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Queue a cancelled or failed job again; it continues from its latest checkpoint
    Resume {
        id: i64,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete a finished job, its metrics and run directory
    Delete {
        id: i64,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// Preset in the server's configs dir (e.g. tiny)
    #[arg(long)]
    pub config: Option<String>,
    #[arg(long)]
    pub name: Option<String>,
    /// train.precision: fp32 | f16 | bf16
    #[arg(long)]
    pub precision: Option<String>,
    /// train.max_steps
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// train.epochs
    #[arg(long)]
    pub epochs: Option<u64>,
    #[arg(long)]
    pub priority: Option<i64>,
    /// More of the job request as a JSON object, merged under the flags above
    /// (e.g. '{"model": {"d_model": 64}}')
    #[arg(long, value_name = "JSON")]
    pub body: Option<String>,
    /// Follow the job after submitting it (as `jobs watch`)
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum ModelsCmd {
    /// List exported models, newest first
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Import a pretrained MarianMT checkpoint (OPUS-MT: config.json, model.safetensors,
    /// tokenizer.json files) into a data directory, offline; run while the server is stopped
    ImportMarian(crate::import_marian::ImportMarianArgs),
}

/// The request body `jobs submit` sends.
pub fn submit_body(a: &SubmitArgs) -> anyhow::Result<Value> {
    let mut body = match &a.body {
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => anyhow::bail!("--body must be a JSON object"),
            Err(e) => anyhow::bail!("--body is not valid JSON: {e}"),
        },
        None => Map::new(),
    };
    if let Some(c) = &a.config {
        body.insert("config".into(), json!(c));
    }
    if let Some(n) = &a.name {
        body.insert("name".into(), json!(n));
    }
    if let Some(p) = a.priority {
        body.insert("priority".into(), json!(p));
    }
    let train = body
        .entry("train")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(train) = train else {
        anyhow::bail!("--body: `train` must be an object");
    };
    if let Some(p) = &a.precision {
        train.insert("precision".into(), json!(p));
    }
    if let Some(m) = a.max_steps {
        train.insert("max_steps".into(), json!(m));
    }
    if let Some(e) = a.epochs {
        train.insert("epochs".into(), json!(e));
    }
    if train.is_empty() {
        body.remove("train");
    }
    Ok(Value::Object(body))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn fmt_opt(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// `ampserve jobs ...`
pub fn run_jobs(cmd: JobsCmd) -> anyhow::Result<()> {
    let rt = runtime()?;
    rt.block_on(async move {
        let mut out = std::io::stdout();
        match cmd {
            JobsCmd::Submit(a) => {
                let c = a.server.client();
                let job = c.post("/api/jobs", &submit_body(&a)?).await?;
                let id = job["id"].as_i64().unwrap_or_default();
                writeln!(out, "{id}")?;
                eprintln!(
                    "job {id} `{}` {} ({}/api/jobs/{id})",
                    job["name"].as_str().unwrap_or(""),
                    job["status"].as_str().unwrap_or(""),
                    c.base()
                );
                if a.watch {
                    finish(watch(&c, id, &mut std::io::stderr()).await?)?;
                }
            }
            JobsCmd::List {
                status,
                limit,
                json,
                server,
            } => {
                let mut path = format!("/api/jobs?limit={limit}");
                if let Some(s) = status {
                    path.push_str(&format!("&status={s}"));
                }
                let v = server.client().get(&path).await?;
                if json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
                    return Ok(());
                }
                writeln!(
                    out,
                    "{:>5}  {:<10}  {:<24}  {:>13}  {:>8}  {:>8}  {:>7}",
                    "id", "status", "name", "step", "loss", "scale", "bleu"
                )?;
                for j in v["jobs"].as_array().into_iter().flatten() {
                    let p = &j["progress"];
                    let m = &j["metrics"];
                    let step = match p["total_steps"].as_i64() {
                        Some(t) => format!("{}/{t}", p["step"]),
                        None => p["step"].to_string(),
                    };
                    writeln!(
                        out,
                        "{:>5}  {:<10}  {:<24}  {:>13}  {:>8}  {:>8}  {:>7}",
                        j["id"],
                        j["status"].as_str().unwrap_or(""),
                        j["name"]
                            .as_str()
                            .unwrap_or("")
                            .chars()
                            .take(24)
                            .collect::<String>(),
                        step,
                        fmt_opt(&m["loss"], 3),
                        fmt_opt(&m["loss_scale"], 0),
                        fmt_opt(&m["best_bleu"], 2),
                    )?;
                }
                eprintln!(
                    "{} of {} jobs",
                    v["jobs"].as_array().map_or(0, Vec::len),
                    v["total"]
                );
            }
            JobsCmd::Show { id, server } => {
                let v = server.client().get(&format!("/api/jobs/{id}")).await?;
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            }
            JobsCmd::Watch { id, server } => {
                finish(watch(&server.client(), id, &mut std::io::stderr()).await?)?;
            }
            JobsCmd::Cancel { id, server } => {
                let j = server
                    .client()
                    .post(&format!("/api/jobs/{id}/cancel"), &json!({}))
                    .await?;
                writeln!(
                    out,
                    "job {id} {}",
                    j["status"].as_str().unwrap_or("cancelling")
                )?;
            }
            JobsCmd::Resume { id, server } => {
                let j = server
                    .client()
                    .post(&format!("/api/jobs/{id}/resume"), &json!({}))
                    .await?;
                writeln!(out, "job {id} {}", j["status"].as_str().unwrap_or("queued"))?;
            }
            JobsCmd::Delete { id, server } => {
                server.client().delete(&format!("/api/jobs/{id}")).await?;
                writeln!(out, "job {id} deleted")?;
            }
        }
        Ok(())
    })
}

/// Exit status of `watch`: a failed job is an error (exit 1).
fn finish(status: String) -> anyhow::Result<()> {
    if status == "failed" {
        anyhow::bail!("the job failed");
    }
    Ok(())
}

/// Follow job `id` until it reaches a terminal status, drawing the tqdm-style line of
/// `ampserve train` (and validation, checkpoint and export lines) on `err`. Returns the final
/// status. The stream is opened before the job is read, so no event in between is lost.
pub async fn watch(client: &ApiClient, id: i64, err: &mut dyn Write) -> anyhow::Result<String> {
    let mut resp = client.stream(&format!("/api/jobs/{id}/events")).await?;
    let job = client.get(&format!("/api/jobs/{id}")).await?;
    let p = &job["progress"];
    let mut total = p["total_steps"].as_u64().unwrap_or(0);
    let mut first_step = p["step"].as_u64().unwrap_or(0);
    let mut start = Instant::now();
    let mut last_print: Option<Instant> = None;
    let mut on_line = false;
    writeln!(
        err,
        "job {id} `{}`: {}",
        job["name"].as_str().unwrap_or(""),
        job["status"].as_str().unwrap_or("")
    )?;
    if total > 0 && first_step > 0 {
        let m = &job["metrics"];
        write!(
            err,
            "\r{}",
            progress_line(
                p["epoch"].as_u64().unwrap_or(0),
                first_step,
                total,
                0.0,
                0.0,
                m["loss"].as_f64().unwrap_or(f64::NAN),
                m["loss_scale"].as_f64().unwrap_or(1.0),
            )
        )?;
        on_line = true;
    }
    err.flush()?;
    let mut parser = SseParser::default();
    loop {
        let chunk = resp
            .chunk()
            .await
            .map_err(|e| anyhow::anyhow!("event stream: {e}"))?;
        let Some(chunk) = chunk else {
            if on_line {
                writeln!(err)?;
            }
            anyhow::bail!(
                "the event stream of job {id} ended before the job did (server stopped?)"
            );
        };
        for ev in parser.push(&chunk) {
            let d: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
            let newline = |err: &mut dyn Write, on_line: &mut bool| -> std::io::Result<()> {
                if std::mem::take(on_line) {
                    writeln!(err)?;
                }
                Ok(())
            };
            match ev.event.as_str() {
                "started" => {
                    total = d["total_steps"].as_u64().unwrap_or(total);
                    first_step = d["resumed_from_step"].as_u64().unwrap_or(0);
                    start = Instant::now();
                }
                "step" => {
                    let step = d["step"].as_u64().unwrap_or(0);
                    let due = last_print.is_none_or(|t| t.elapsed().as_millis() >= 200);
                    if due || step == total {
                        last_print = Some(Instant::now());
                        let el = start.elapsed().as_secs_f64();
                        let it_s = step.saturating_sub(first_step) as f64 / el.max(1e-9);
                        write!(
                            err,
                            "\r{}",
                            progress_line(
                                d["epoch"].as_u64().unwrap_or(0),
                                step,
                                total,
                                el,
                                it_s,
                                d["loss"].as_f64().unwrap_or(f64::NAN),
                                d["loss_scale"].as_f64().unwrap_or(1.0),
                            )
                        )?;
                        on_line = true;
                        err.flush()?;
                    }
                }
                "validation" => {
                    newline(err, &mut on_line)?;
                    writeln!(
                        err,
                        "valid @ step {}: loss {} | BLEU {} | chrF {}",
                        d["step"],
                        fmt_opt(&d["val_loss"], 3),
                        fmt_opt(&d["bleu"], 2),
                        fmt_opt(&d["chrf"], 2)
                    )?;
                }
                "checkpoint" => {
                    newline(err, &mut on_line)?;
                    writeln!(
                        err,
                        "checkpoint @ step {}{}",
                        d["step"],
                        if d["is_best"].as_bool() == Some(true) {
                            " [best]"
                        } else {
                            ""
                        }
                    )?;
                }
                "model" => {
                    newline(err, &mut on_line)?;
                    writeln!(
                        err,
                        "exported as model {} `{}`",
                        d["model_id"],
                        d["name"].as_str().unwrap_or("")
                    )?;
                }
                "status" => {
                    let status = d["status"].as_str().unwrap_or("").to_string();
                    if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
                        newline(err, &mut on_line)?;
                        match d["error"].as_str() {
                            Some(e) => writeln!(err, "job {id} {status}: {e}")?,
                            None => writeln!(err, "job {id} {status}")?,
                        }
                        return Ok(status);
                    }
                }
                _ => {}
            }
        }
    }
}

/// `ampserve models list`
pub fn run_models(cmd: ModelsCmd) -> anyhow::Result<()> {
    let (json, server) = match cmd {
        ModelsCmd::List { json, server } => (json, server),
        ModelsCmd::ImportMarian(a) => return crate::import_marian::run(a),
    };
    runtime()?.block_on(async move {
        let v = server.client().get("/api/models").await?;
        let mut out = std::io::stdout();
        if json {
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            return Ok(());
        }
        let models = v["models"].as_array().cloned().unwrap_or_default();
        writeln!(
            out,
            "{:>5}  {:<32}  {:<8}  {:>5}  {:>6}  {:>7}  {:>9}",
            "id", "name", "kind", "job", "pair", "bleu", "params"
        )?;
        for m in &models {
            writeln!(
                out,
                "{:>5}  {:<32}  {:<8}  {:>5}  {:>6}  {:>7}  {:>9}",
                m["id"],
                m["name"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(32)
                    .collect::<String>(),
                m["kind"].as_str().unwrap_or("ampserve"),
                m["job_id"],
                format!(
                    "{}-{}",
                    m["src_lang"].as_str().unwrap_or("?"),
                    m["tgt_lang"].as_str().unwrap_or("?")
                ),
                fmt_opt(&m["val_bleu"], 2),
                m["params"],
            )?;
        }
        eprintln!("{} models", models.len());
        Ok(())
    })
}

/// `ampserve translate --server URL`: the same lines in and out as the local command, sent to
/// `POST /api/translate` in batches. `model` is a server model id (default: the newest).
pub fn translate_remote(
    server: &str,
    model: Option<&str>,
    lines: &[String],
    beam: usize,
    max_length: Option<usize>,
    batch: usize,
    json_out: bool,
) -> anyhow::Result<()> {
    let model: Option<i64> = match model {
        Some(m) => Some(m.parse().map_err(|_| {
            anyhow::anyhow!(
                "--model with --server is a model id from `ampserve models list`, got `{m}`"
            )
        })?),
        None => None,
    };
    let client = ApiClient::new(server, std::env::var("AMPSERVE_API_TOKEN").ok());
    runtime()?.block_on(async move {
        let mut out = std::io::stdout();
        for chunk in lines.chunks(batch.max(1)) {
            let texts: Vec<&str> = chunk
                .iter()
                .map(|s| s.as_str())
                .filter(|s| !s.trim().is_empty())
                .collect();
            let mut got = Vec::new();
            if !texts.is_empty() {
                let mut body = json!({"texts": texts, "beam_size": beam});
                if let Some(m) = model {
                    body["model"] = json!(m);
                }
                if let Some(l) = max_length {
                    body["max_length"] = json!(l);
                }
                let v = client.post("/api/translate", &body).await?;
                got = v["translations"].as_array().cloned().unwrap_or_default();
            }
            let mut it = got.into_iter();
            for src in chunk {
                if src.trim().is_empty() {
                    writeln!(out)?;
                    continue;
                }
                let t = it.next().unwrap_or(Value::Null);
                if json_out {
                    writeln!(
                        out,
                        "{}",
                        json!({"source": src, "text": t["text"], "source_tokens": t["source_tokens"],
                               "tokens": t["tokens"], "score": t["score"]})
                    )?;
                } else {
                    writeln!(out, "{}", t["text"].as_str().unwrap_or(""))?;
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        jobs: JobsCmd,
    }

    #[test]
    fn submit_flags_become_the_request_body_over_the_json() {
        let Cli {
            jobs: JobsCmd::Submit(a),
        } = Cli::parse_from([
            "x",
            "submit",
            "--config",
            "tiny",
            "--precision",
            "f16",
            "--max-steps",
            "300",
            "--body",
            r#"{"train": {"lr": 0.001, "max_steps": 5}, "model": {"d_model": 64}}"#,
        ])
        else {
            panic!("not submit")
        };
        assert_eq!(
            submit_body(&a).unwrap(),
            json!({"config": "tiny", "train": {"lr": 0.001, "max_steps": 300, "precision": "f16"},
                   "model": {"d_model": 64}})
        );
        let Cli {
            jobs: JobsCmd::Submit(bad),
        } = Cli::parse_from(["x", "submit", "--body", "[1]"])
        else {
            panic!("not submit")
        };
        assert!(submit_body(&bad)
            .unwrap_err()
            .to_string()
            .contains("JSON object"));
    }
}
