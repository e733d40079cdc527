//! Shared by the server integration tests: a fake trainer with the real trainer's contract
//! (events, checkpoint files with sha256 sidecars, retention, cancel, resume), and a server on
//! a temporary directory driven over real HTTP.
#![allow(dead_code)]

use ampserve::app::{build_app_with, App, ServeArgs};
use ampserve::config::TrainSpec;
use ampserve::train::{
    CheckpointRecord, KeepLastPlusBest, RunOptions, Sample, StartInfo, StepRecord, Summary,
    TrainError, TrainEvent, ValidationRecord,
};
use ampserve::worker::{PoolConfig, Trainer};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Behaves like `train::run` without the math: `max_steps` steps (50 when 0), a validation
/// every `valid_every`, a checkpoint every `checkpoint.every_steps` and at the end, the real
/// retention (`train::KeepLastPlusBest`), resume from the latest checkpoint whose sha256
/// matches its sidecar. Step 17, 34, ... overflow (skipped, loss scale halves).
///
/// `hold`: while set, the fake waits before any step after `hold_after` (still honouring
/// cancel), so tests can observe a running job without timing assumptions.
/// A spec name containing `panic` panics at step 3; `fail` returns an error at step 2.
pub struct FakeTrainer {
    pub step_sleep: Duration,
    pub hold: AtomicBool,
    pub hold_after: AtomicU64,
    /// (spec name, resumed_from_step, run number) per call.
    pub runs: Mutex<Vec<(String, u64, u64)>>,
    /// Runs so far; the fake's rows carry `tokens_per_s = 1000 * run number`.
    pub run_counter: AtomicU64,
}

impl FakeTrainer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            step_sleep: Duration::from_millis(2),
            hold: AtomicBool::new(false),
            hold_after: AtomicU64::new(0),
            runs: Mutex::new(Vec::new()),
            run_counter: AtomicU64::new(0),
        })
    }

    pub fn held_after(step: u64) -> Arc<Self> {
        let t = Self::new();
        t.hold.store(true, Ordering::SeqCst);
        t.hold_after.store(step, Ordering::SeqCst);
        t
    }

    pub fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
    }

    pub fn runs(&self) -> Vec<(String, u64, u64)> {
        self.runs.lock().unwrap().clone()
    }
}

pub fn sha256_file(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Sidecar {
    step: u64,
    epoch: u64,
    sha256: String,
    val_bleu: Option<f64>,
}

fn ckpt_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("ckpt-{step:08}.safetensors"))
}

/// Valid checkpoints in the directory (sha256 matches the sidecar), oldest first.
fn valid_checkpoints(dir: &Path) -> Vec<(u64, PathBuf, Option<f64>)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let Ok(text) = std::fs::read_to_string(p.with_extension("json")) else {
                continue;
            };
            let Ok(side) = serde_json::from_str::<Sidecar>(&text) else {
                continue;
            };
            if sha256_file(&p) == side.sha256 {
                out.push((side.step, p, side.val_bleu));
            } else {
                tracing::warn!("skipping corrupt checkpoint {}", p.display());
            }
        }
    }
    out.sort_by_key(|c| c.0);
    out
}

impl Trainer for FakeTrainer {
    fn run(
        &self,
        spec: &TrainSpec,
        opts: &RunOptions,
        sink: &mut dyn FnMut(TrainEvent),
        cancel: &AtomicBool,
    ) -> Result<Summary, TrainError> {
        let run_no = self.run_counter.fetch_add(1, Ordering::SeqCst) + 1;
        let ck_dir = opts.out_dir.join("checkpoints");
        std::fs::create_dir_all(&ck_dir)?;
        let existing = if opts.resume {
            valid_checkpoints(&ck_dir)
        } else {
            Vec::new()
        };
        let start = existing.last().map(|c| c.0).unwrap_or(0);
        self.runs
            .lock()
            .unwrap()
            .push((spec.name.clone(), start, run_no));
        let total = if spec.train.max_steps == 0 {
            50
        } else {
            spec.train.max_steps as u64
        };
        sink(TrainEvent::Started(StartInfo {
            run_dir: opts.out_dir.clone(),
            steps_per_epoch: total,
            total_steps: total,
            resumed_from_step: start,
            src_vocab: 100,
            tgt_vocab: 120,
            train_pairs: 300,
            valid_pairs: 30,
            dropped_long: 0,
            truncated_long: 0,
            malformed_lines: 0,
            parameters: 12345,
            device: format!("{:?}", opts.device),
        }));
        // (step, path, bleu) of checkpoints on disk, for retention.
        let mut kept: Vec<(u64, PathBuf, Option<f64>)> =
            existing.into_iter().filter(|c| c.0 <= start).collect();
        // (step, BLEU) of the latest validation
        let mut last_bleu: Option<(u64, f64)> = None;
        let mut scale = 65536.0;
        let mut skipped = 0;
        let write_ckpt = |step: u64,
                          bleu: Option<f64>,
                          kept: &mut Vec<(u64, PathBuf, Option<f64>)>,
                          sink: &mut dyn FnMut(TrainEvent)|
         -> Result<(), TrainError> {
            let path = ckpt_path(&ck_dir, step);
            let bytes: Vec<u8> = (0..4096u32)
                .map(|i| ((i as u64 * 31 + step * 7 + run_no) % 251) as u8)
                .collect();
            std::fs::write(&path, &bytes)?;
            let sha = hex::encode(Sha256::digest(&bytes));
            let side = Sidecar {
                step,
                epoch: 1,
                sha256: sha.clone(),
                val_bleu: bleu,
            };
            std::fs::write(
                path.with_extension("json"),
                serde_json::to_vec(&side).unwrap(),
            )?;
            kept.retain(|c| c.0 != step);
            kept.push((step, path.clone(), bleu));
            // the real trainer's retention strategy
            let retention = KeepLastPlusBest {
                keep_last: spec.checkpoint.keep_last,
            };
            let on_disk: Vec<(u64, Option<f64>)> = kept.iter().map(|c| (c.0, c.2)).collect();
            let best = retention.best(&on_disk);
            let gone = retention.to_remove(&on_disk);
            let mut removed = Vec::new();
            kept.retain(|c| {
                let keep = !gone.contains(&c.0);
                if !keep {
                    let _ = std::fs::remove_file(&c.1);
                    let _ = std::fs::remove_file(c.1.with_extension("json"));
                    removed.push(c.1.clone());
                }
                keep
            });
            sink(TrainEvent::Checkpoint(CheckpointRecord {
                step,
                epoch: 1,
                path,
                size_bytes: bytes.len() as u64,
                sha256: sha,
                val_bleu: bleu,
                is_best: best == Some(step),
                removed,
            }));
            Ok(())
        };
        let t0 = Instant::now();
        let mut done = start;
        for step in start + 1..=total {
            loop {
                if cancel.load(Ordering::SeqCst) {
                    if done > 0 && !kept.iter().any(|c| c.0 == done) {
                        write_ckpt(done, bleu_at(last_bleu, done), &mut kept, sink)?;
                    }
                    let s = summary(opts, done, skipped, scale, t0, true);
                    sink(TrainEvent::Finished(s.clone()));
                    return Ok(s);
                }
                if self.hold.load(Ordering::SeqCst) && step > self.hold_after.load(Ordering::SeqCst)
                {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                break;
            }
            if spec.name.contains("panic") && step == 3 {
                panic!("fake trainer exploded at step {step}");
            }
            if spec.name.contains("fail") && step == 2 {
                return Err(TrainError::Data(
                    ampserve::data::DataError::Io {
                        action: "read",
                        path: "corpus.tsv".into(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "vanished at step 2",
                        ),
                    }
                    .into(),
                ));
            }
            std::thread::sleep(self.step_sleep);
            let overflow = step % 17 == 0;
            if overflow {
                skipped += 1;
            }
            sink(TrainEvent::Step(StepRecord {
                step,
                epoch: 1,
                loss: 5.0 * (-(step as f64) / 30.0).exp() + 0.1 * ((step * 7 % 5) as f64),
                lr: 1e-3,
                loss_scale: scale,
                found_inf: overflow,
                skipped: overflow,
                grad_norm: if overflow {
                    f64::NAN
                } else {
                    1.0 / step as f64
                },
                // Encodes which run wrote the row, so tests can see replaced rows.
                tokens_per_s: 1000.0 * run_no as f64,
                step_ms: 2.0,
            }));
            if overflow {
                scale /= 2.0;
            }
            done = step;
            let valid_every = spec.train.valid_every as u64;
            if valid_every > 0 && step % valid_every == 0 {
                // Rises then falls, so "best" is not simply the latest.
                let bleu = if step <= total / 2 {
                    step as f64 / 2.0
                } else {
                    (total - step) as f64 / 4.0
                };
                last_bleu = Some((step, bleu));
                sink(TrainEvent::Validation(ValidationRecord {
                    step,
                    epoch: 1,
                    val_loss: 4.0 - step as f64 / total as f64,
                    bleu,
                    chrf: bleu * 1.5,
                    cer: 0.5,
                    wer: 0.7,
                    sentences: 30,
                    samples: vec![Sample {
                        source: "Hello.".into(),
                        reference: "Ciao.".into(),
                        hypothesis: format!("Ciao {step}."),
                    }],
                }));
            }
            let every = spec.checkpoint.every_steps as u64;
            if (every > 0 && step % every == 0) || step == total {
                write_ckpt(step, bleu_at(last_bleu, step), &mut kept, sink)?;
            }
        }
        let s = summary(opts, done, skipped, scale, t0, false);
        sink(TrainEvent::Finished(s.clone()));
        Ok(s)
    }
}

/// A checkpoint's validation BLEU, as the real trainer records it: only when it validated at
/// that step.
fn bleu_at(last: Option<(u64, f64)>, step: u64) -> Option<f64> {
    last.filter(|(s, _)| *s == step).map(|(_, b)| b)
}

fn summary(
    opts: &RunOptions,
    steps: u64,
    skipped: u64,
    scale: f64,
    t0: Instant,
    cancelled: bool,
) -> Summary {
    Summary {
        run_dir: opts.out_dir.clone(),
        steps,
        epochs_completed: 0,
        skipped_steps: skipped,
        final_loss: 1.0,
        final_loss_scale: scale,
        best_bleu: None,
        best_checkpoint: None,
        latest_checkpoint: None,
        wall_s: t0.elapsed().as_secs_f64(),
        tokens_per_s: 1000.0,
        cancelled,
        stopped_by: None,
    }
}

/// The real router on a temporary data directory, served on an ephemeral port.
pub struct TestServer {
    pub app: App,
    pub base: String,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    server: tokio::task::JoinHandle<()>,
}

pub fn args_for(dir: &Path) -> ServeArgs {
    ServeArgs {
        data_dir: dir.to_path_buf(),
        devices: vec!["cpu".into()],
        ..ServeArgs::default()
    }
}

impl TestServer {
    pub async fn start(args: ServeArgs, trainer: Arc<dyn Trainer>) -> Self {
        let config = PoolConfig {
            poll_every: Duration::from_millis(200),
            ..PoolConfig::default()
        };
        let app = build_app_with(&args, trainer, config)
            .await
            .expect("build_app");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = app.router.clone();
        let mut stop = app.state.shutdown.clone();
        let limits = app.limits;
        let server = tokio::spawn(async move {
            ampserve::http::serve(listener, router, limits, async move {
                let _ = stop.wait_for(|v| *v).await;
            })
            .await
            .unwrap();
        });
        TestServer {
            app,
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            data_dir: args.data_dir.clone(),
            server,
        }
    }

    /// Graceful shutdown (what Ctrl-C does).
    pub async fn stop(self) {
        self.app.shutdown().await;
        let _ = self.server.await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        split(r).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        split(r).await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        split(r).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        let r = self.client.delete(self.url(path)).send().await.unwrap();
        split(r).await
    }

    pub async fn job(&self, id: i64) -> Value {
        let (s, v) = self.get(&format!("/api/jobs/{id}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    /// Poll until `pred(job)` holds. The deadline only keeps a broken test from hanging.
    pub async fn wait_job(&self, id: i64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let j = self.job(id).await;
            if pred(&j) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never reached {what}: {j}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_status(&self, id: i64, status: &str) -> Value {
        self.wait_job(id, status, |j| j["status"] == status).await
    }

    /// Submit a job and return its id (asserting 201).
    pub async fn submit(&self, body: &Value) -> i64 {
        let (s, v) = self.post("/api/jobs", body).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_i64().unwrap()
    }

    pub async fn all_metrics(&self, id: i64) -> Vec<Value> {
        let (s, v) = self
            .get(&format!("/api/jobs/{id}/metrics?limit=100000"))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["points"].as_array().unwrap().clone()
    }
}

pub async fn split(r: reqwest::Response) -> (StatusCode, Value) {
    let s = r.status();
    let text = r.text().await.unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON body ({s}): {text}"))
    };
    (s, v)
}

/// Read an SSE response to its end: (event name, data JSON) pairs.
pub async fn read_sse(mut r: reqwest::Response) -> Vec<(String, Value)> {
    let mut buf = String::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let mut out = Vec::new();
    for block in buf.split("\n\n") {
        let mut name = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event:") {
                name = Some(n.trim().to_string());
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            }
        }
        if let Some(name) = name {
            out.push((name, serde_json::from_str(&data).unwrap_or(Value::Null)));
        }
    }
    out
}

/// A small job for the fake: 60 steps, validation and checkpoint every 20, keep the last 2.
pub fn fake_job(name: &str) -> Value {
    serde_json::json!({
        "config": "tiny",
        "name": name,
        "train": {"max_steps": 60, "valid_every": 20},
        "checkpoint": {"every_steps": 20, "keep_last": 2}
    })
}

/// The real `ampserve serve` binary on a data directory (port chosen by the OS), its log
/// drained (and echoed) so it never blocks on a full pipe.
pub struct BinServer {
    pub child: std::process::Child,
    pub base: String,
}

pub fn spawn_bin_server(data_dir: &Path, extra: &[&str]) -> BinServer {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ampserve"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--devices",
            "cpu",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = announced_base(&mut child, true);
    BinServer { child, base }
}

/// The `http://127.0.0.1:PORT` a spawned `ampserve serve` (bound to port 0) logs on stderr. Keeps
/// draining the log afterwards, so the server never blocks on a full pipe; `echo` copies it to
/// the test's stderr.
pub fn announced_base(child: &mut std::process::Child, echo: bool) -> String {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("the server's stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if echo {
                eprintln!("{line}");
            }
            if let Some(i) = line.find("http://127.0.0.1:") {
                let rest = &line[i + "http://127.0.0.1:".len()..];
                let port: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                let _ = tx.send(port);
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("server did not start");
    format!("http://127.0.0.1:{port}")
}

impl BinServer {
    pub async fn get(&self, c: &reqwest::Client, path: &str) -> Value {
        c.get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn post(&self, c: &reqwest::Client, path: &str, body: &Value) -> (StatusCode, Value) {
        split(
            c.post(format!("{}{path}", self.base))
                .json(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// SIGKILL (no graceful anything) and reap.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// Send a signal with `kill(1)` (keeps the tests free of libc). False when the process is gone.
pub fn signal(pid: u32, sig: &str) -> bool {
    std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Live child processes of `parent` (from /proc; zombies excluded).
pub fn child_pids(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.to_string()) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 1 && f[0] != "Z" && f[1].parse::<u32>().ok() == Some(parent) {
            out.push(pid);
        }
    }
    out
}

pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A tiny real job on Tatoeba en-it (300 pairs, 32-wide model, one layer).
pub fn tiny_real_job(name: &str, max_steps: u64, checkpoint_every: u64) -> Value {
    serde_json::json!({
        "config": "tiny",
        "name": name,
        "data": {"max_train_pairs": 300},
        "model": {"d_model": 32, "layers": 1, "heads": 2, "d_ff": 64},
        "train": {"batch_size": 16, "max_steps": max_steps, "epochs": 1000, "warmup_steps": 10,
                  "valid_every": 0, "valid_max_sentences": 10, "valid_samples": 1},
        "checkpoint": {"every_steps": checkpoint_every, "keep_last": 2}
    })
}

/// Steps of the stored metric rows, in order.
pub fn metric_steps(points: &Value) -> Vec<i64> {
    points["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["step"].as_i64().unwrap())
        .collect()
}

/// One request helper per endpoint the server tests drive (zero-to-production's `TestApp`
/// style), so a test reads as the behaviour it checks.
impl TestServer {
    /// Opens the job's Server-Sent Events stream (the response, to check its headers and read).
    pub async fn events(&self, id: i64) -> reqwest::Response {
        self.client
            .get(self.url(&format!("/api/jobs/{id}/events")))
            .send()
            .await
            .unwrap()
    }

    /// The Prometheus text at `/metrics`.
    pub async fn prometheus(&self) -> String {
        let r = self.client.get(self.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    pub async fn cancel(&self, id: i64) -> (StatusCode, Value) {
        self.post(&format!("/api/jobs/{id}/cancel"), &serde_json::json!({}))
            .await
    }

    pub async fn resume(&self, id: i64) -> (StatusCode, Value) {
        self.post(&format!("/api/jobs/{id}/resume"), &serde_json::json!({}))
            .await
    }

    /// The job's checkpoint rows (asserting 200).
    pub async fn checkpoints(&self, id: i64) -> Vec<Value> {
        let (s, v) = self.get(&format!("/api/jobs/{id}/checkpoints")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["checkpoints"].as_array().unwrap().clone()
    }

    /// The steps of the job's checkpoint rows, oldest first.
    pub async fn checkpoint_steps(&self, id: i64) -> Vec<i64> {
        let cks = self.checkpoints(id).await;
        cks.iter().map(|c| c["step"].as_i64().unwrap()).collect()
    }

    /// Uploads a corpus (`query`: name, src_lang, tgt_lang) as tab-separated text.
    pub async fn upload_corpus(
        &self,
        query: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let r = self
            .client
            .post(self.url(&format!("/api/corpora?{query}")))
            .header("content-type", "text/tab-separated-values")
            .body(body)
            .send()
            .await
            .unwrap();
        split(r).await
    }
}

/// Asserts a JSON error answer: the status, the code, a non-empty message, and the field it
/// names (or that it names none).
pub fn assert_api_error(s: StatusCode, v: &Value, status: u16, code: &str, field: Option<&str>) {
    assert_eq!(s.as_u16(), status, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    match field {
        Some(f) => assert_eq!(v["error"]["field"], f, "{v}"),
        None => assert!(v["error"].get("field").is_none(), "{v}"),
    }
}
