//! Isolated training: each job runs in its own child process (this same binary, hidden
//! subcommand `ampserve run-job`), so a job that runs out of memory, aborts or is killed takes
//! only itself down, never the server and its other jobs.
//!
//! Protocol (one JSON object per line). Server → child on stdin: first the [`JobRequest`],
//! then `cancel`, and `ack` / `nack <why>` answering each barrier. Child → server on stdout:
//! [`ChildMsg`]s (events, barriers before each checkpoint, the final result). Logs go to
//! stderr; the server forwards them and keeps the last lines to explain a crash. When the
//! server goes away (its end of stdin closes) the child exits at once, so a restarted server
//! never races an orphan on the same run directory.

use super::{DeviceSpec, Trainer};
use crate::config::TrainSpec;
use crate::train::{self, Barrier, BarrierError, RunOptions, Summary, TrainError, TrainEvent};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The hidden subcommand the server runs its jobs with.
pub const RUN_JOB_SUBCOMMAND: &str = "run-job";

/// What the child is asked to run (the first line on its stdin).
#[derive(Debug, Serialize, Deserialize)]
pub struct JobRequest {
    pub spec: TrainSpec,
    pub out_dir: PathBuf,
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub resume: bool,
}

/// What the child reports (one line each on its stdout).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum ChildMsg {
    Event {
        event: TrainEvent,
    },
    /// About to write the checkpoint at `step`; waits for `ack` on stdin.
    Barrier {
        step: u64,
    },
    Done {
        result: Result<Summary, String>,
    },
}

/// Runs each job in a child process of `exe` (the server passes its own executable).
#[derive(Debug, Clone)]
pub struct ProcessTrainer {
    exe: PathBuf,
    pids: Arc<Mutex<Vec<(PathBuf, u32)>>>,
}

impl ProcessTrainer {
    pub fn new(exe: impl Into<PathBuf>) -> Self {
        Self {
            exe: exe.into(),
            pids: Arc::default(),
        }
    }

    /// The running binary itself.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(Self::new(std::env::current_exe()?))
    }

    /// (run directory, pid) of each child running now.
    pub fn children(&self) -> Vec<(PathBuf, u32)> {
        self.pids.lock().unwrap().clone()
    }
}

fn device_name(d: &candle_core::Device) -> Result<String, TrainError> {
    match d.location() {
        candle_core::DeviceLocation::Cpu => Ok("cpu".into()),
        candle_core::DeviceLocation::Cuda { gpu_id } => Ok(format!("cuda:{gpu_id}")),
        other => Err(TrainError::Crashed(format!(
            "cannot run on {other:?} (only cpu and cuda:N)"
        ))),
    }
}

/// The usual name of a signal, for the job's error message.
fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        _ => "signal",
    }
}

/// "was killed by signal 9 (SIGKILL; out of memory?)", "exited with status 3".
pub fn describe_exit(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let hint = match sig {
                9 => "; out of memory?",
                6 => "; aborted, e.g. an allocation failed",
                11 | 7 => "; memory fault",
                _ => "",
            };
            return format!("was killed by signal {sig} ({}{hint})", signal_name(sig));
        }
    }
    match status.code() {
        Some(code) => format!("exited with status {code} before reporting a result"),
        None => "ended without an exit status".into(),
    }
}

fn send_line(stdin: &Mutex<std::process::ChildStdin>, line: &str) -> std::io::Result<()> {
    let mut w = stdin.lock().unwrap();
    w.write_all(line.as_bytes())?;
    w.write_all(b"\n")?;
    w.flush()
}

impl Trainer for ProcessTrainer {
    fn run(
        &self,
        spec: &TrainSpec,
        opts: &RunOptions,
        sink: &mut dyn FnMut(TrainEvent),
        cancel: &AtomicBool,
    ) -> Result<Summary, TrainError> {
        let request = JobRequest {
            spec: spec.clone(),
            out_dir: opts.out_dir.clone(),
            device: device_name(&opts.device)?,
            resume: opts.resume,
        };
        let mut cmd = Command::new(&self.exe);
        cmd.arg(RUN_JOB_SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group: a Ctrl-C in the server's terminal stops the server (which
        // checkpoints and re-queues), not the child behind its back.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|e| {
            TrainError::Crashed(format!("could not start ({}: {e})", self.exe.display()))
        })?;
        let pid = child.id();
        self.pids.lock().unwrap().push((opts.out_dir.clone(), pid));
        let stdin = Mutex::new(child.stdin.take().expect("piped stdin"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let line =
            serde_json::to_string(&request).map_err(|e| TrainError::Crashed(e.to_string()))?;
        let mut start_error = send_line(&stdin, &line).err();

        let tail: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());
        let finished = AtomicBool::new(false);
        let mut result: Option<Result<Summary, String>> = None;
        let mut protocol_error: Option<String> = None;
        std::thread::scope(|s| {
            // Child logs: forwarded, the last few kept to explain a crash.
            s.spawn(|| {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[runner {pid}] {line}");
                    let mut t = tail.lock().unwrap();
                    if t.len() == 8 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
            // Cancellation is polled (the flag is a plain AtomicBool) and sent once.
            s.spawn(|| {
                while !finished.load(Ordering::SeqCst) {
                    if cancel.load(Ordering::SeqCst) {
                        let _ = send_line(&stdin, "cancel");
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<ChildMsg>(&line) {
                    Ok(ChildMsg::Event { event }) => sink(event),
                    Ok(ChildMsg::Barrier { step }) => {
                        let answer = match &opts.barrier {
                            Some(b) => b.wait(step),
                            None => Ok(()),
                        };
                        let reply = match answer {
                            Ok(()) => "ack".to_string(),
                            Err(e) => format!("nack {}", e.to_string().replace('\n', " ")),
                        };
                        let _ = send_line(&stdin, &reply);
                    }
                    Ok(ChildMsg::Done { result: r }) => result = Some(r),
                    Err(e) => {
                        protocol_error.get_or_insert(format!("sent an unreadable line ({e})"));
                        tracing::warn!(pid, "training process wrote a non-protocol line: {line}");
                    }
                }
            }
            finished.store(true, Ordering::SeqCst);
        });
        let status = child.wait();
        self.pids.lock().unwrap().retain(|(_, p)| *p != pid);
        match (result, status) {
            (Some(Ok(summary)), _) => Ok(summary),
            (Some(Err(msg)), _) => Err(TrainError::Failed(msg)),
            (None, Ok(status)) => {
                let mut cause = describe_exit(status);
                if let Some(e) = start_error.take().map(|e| e.to_string()).or(protocol_error) {
                    cause.push_str(&format!(" ({e})"));
                }
                let last = tail
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .cloned();
                if let Some(l) = last {
                    let l: String = l.chars().take(300).collect();
                    cause.push_str(&format!("; its last output: {l}"));
                }
                Err(TrainError::Crashed(cause))
            }
            (None, Err(e)) => Err(TrainError::Crashed(format!("could not be waited for: {e}"))),
        }
    }
}

/// `ampserve run-job`: read the [`JobRequest`], train, report over stdout. Exits (status 3) as
/// soon as its stdin closes: the server that started it is gone.
pub fn child_main() -> anyhow::Result<()> {
    let mut input = BufReader::new(std::io::stdin());
    let mut first = String::new();
    input.read_line(&mut first)?;
    let req: JobRequest = serde_json::from_str(&first)
        .map_err(|e| anyhow::anyhow!("{RUN_JOB_SUBCOMMAND}: unreadable job request: {e}"))?;
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let send = {
        let out = out.clone();
        move |m: &ChildMsg| {
            let line = serde_json::to_string(m).expect("protocol messages serialise");
            let mut w = out.lock().unwrap();
            if writeln!(w, "{line}").and_then(|_| w.flush()).is_err() {
                eprintln!("{RUN_JOB_SUBCOMMAND}: the server went away; stopping");
                std::process::exit(3);
            }
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<Result<(), BarrierError>>();
    {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            for line in input.lines() {
                let Ok(line) = line else { break };
                let line = line.trim();
                if line == "cancel" {
                    cancel.store(true, Ordering::SeqCst);
                } else if line == "ack" {
                    let _ = ack_tx.send(Ok(()));
                } else if let Some(why) = line.strip_prefix("nack") {
                    let _ = ack_tx.send(Err(BarrierError::Persist(why.trim().to_string())));
                }
            }
            eprintln!("{RUN_JOB_SUBCOMMAND}: the server went away; stopping");
            std::process::exit(3);
        });
    }
    let barrier = {
        let send = send.clone();
        let ack_rx = Mutex::new(ack_rx);
        Barrier::new(move |step| {
            send(&ChildMsg::Barrier { step });
            ack_rx
                .lock()
                .unwrap()
                .recv()
                .map_err(|_| BarrierError::Gone("the server went away"))?
        })
    };
    let result = (|| -> Result<Summary, String> {
        let device: DeviceSpec = req.device.parse().map_err(|e| format!("{e}"))?;
        let opts = RunOptions {
            out_dir: req.out_dir.clone(),
            device: device.open().map_err(|e| e.to_string())?,
            resume: req.resume,
            barrier: Some(barrier),
        };
        let mut sink = |event: TrainEvent| send(&ChildMsg::Event { event });
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            train::run(&req.spec, &opts, &mut sink, &cancel)
        })) {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(p) => Err(format!(
                "trainer panicked: {}",
                super::job::panic_message(&*p)
            )),
        }
    })();
    send(&ChildMsg::Done { result });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_with_a_nan_grad_norm_crosses_the_pipe() {
        let ev = TrainEvent::Step(train::StepRecord {
            step: 17,
            epoch: 0,
            loss: 3.5,
            lr: 1e-3,
            loss_scale: 65536.0,
            found_inf: true,
            skipped: true,
            grad_norm: f64::NAN,
            tokens_per_s: 1000.0,
            step_ms: 2.0,
        });
        let line = serde_json::to_string(&ChildMsg::Event { event: ev }).unwrap();
        let back: ChildMsg = serde_json::from_str(&line).unwrap();
        match back {
            ChildMsg::Event {
                event: TrainEvent::Step(s),
            } => {
                assert_eq!(s.step, 17);
                assert!(s.grad_norm.is_nan());
                assert_eq!(s.loss, 3.5);
            }
            other => panic!("{other:?}"),
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_signal_death_is_described_in_words() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL; out of memory?)"
        );
        assert!(describe_exit(ExitStatus::from_raw(6)).contains("signal 6 (SIGABRT"));
        assert!(describe_exit(ExitStatus::from_raw(3 << 8)).contains("exited with status 3"));
    }
}
