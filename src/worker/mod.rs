//! The device pool: one worker per device claims queued jobs, runs the trainer on a dedicated
//! OS thread (never on tokio's threads), persists the events it streams back (batched metric
//! inserts), honours cancellation, and re-queues interrupted jobs at start. The server's trainer
//! is [`ProcessTrainer`]: each job in its own process, so a crash fails the job, not the server.

mod claim;
mod events;
pub mod fork;
mod heartbeat;
mod job;
mod notify_parts;
mod persist;
mod pool;
pub mod process;
mod publish;
mod relay;
mod sync;

pub use events::{JobEvent, JobEventKind};
pub use fork::{ForkFailure, StagedFork};
pub use heartbeat::host_name;
pub use pool::{LiveJob, PoolConfig, PoolHandle, WriteStats};
pub use process::ProcessTrainer;
pub use publish::{model_row, ExportFailure};

use crate::config::TrainSpec;
use crate::train::{RunOptions, Summary, TrainError, TrainEvent};
use std::sync::atomic::AtomicBool;

/// What a worker runs. The real implementation is [`CandleTrainer`]; tests plug in fakes.
pub trait Trainer: Send + Sync + 'static {
    fn run(
        &self,
        spec: &TrainSpec,
        opts: &RunOptions,
        sink: &mut dyn FnMut(TrainEvent),
        cancel: &AtomicBool,
    ) -> Result<Summary, TrainError>;
}

/// The library's training loop, [`crate::train::run`].
#[derive(Debug, Default, Clone, Copy)]
pub struct CandleTrainer;

impl Trainer for CandleTrainer {
    fn run(
        &self,
        spec: &TrainSpec,
        opts: &RunOptions,
        sink: &mut dyn FnMut(TrainEvent),
        cancel: &AtomicBool,
    ) -> Result<Summary, TrainError> {
        crate::train::run(spec, opts, sink, cancel)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("unknown device `{0}`: expected `cpu` or `cuda:N`")]
    BadDevice(String),
    #[error("device `{0}` needs CUDA, but this ampserve was built without the `cuda` feature (rebuild with `--features cuda`, see scripts/build-cuda.sh)")]
    NoCuda(String),
    #[error("cannot open device `{device}`: {message} (is an NVIDIA GPU present, its driver loaded, and the index below the GPU count that `nvidia-smi -L` lists?)")]
    Open { device: String, message: String },
    #[error("no devices configured")]
    Empty,
}

/// A device a worker trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = WorkerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        if t == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        let n = match t.as_str() {
            "cuda" | "gpu" => Some(0),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok()),
        };
        match n {
            Some(n) if cfg!(feature = "cuda") => Ok(DeviceSpec::Cuda(n)),
            Some(_) => Err(WorkerError::NoCuda(s.trim().to_string())),
            None => Err(WorkerError::BadDevice(s.trim().to_string())),
        }
    }
}

impl DeviceSpec {
    /// What a job's `"device"` requirement matches.
    pub fn kind(&self) -> crate::store::nodes::DeviceKind {
        match self {
            DeviceSpec::Cpu => crate::store::nodes::DeviceKind::Cpu,
            DeviceSpec::Cuda(_) => crate::store::nodes::DeviceKind::Cuda,
        }
    }

    pub fn open(&self) -> Result<candle_core::Device, WorkerError> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(n) => {
                candle_core::Device::new_cuda(*n).map_err(|e| WorkerError::Open {
                    device: self.to_string(),
                    // the driver's error, without the backtrace candle attaches under RUST_BACKTRACE
                    message: match e {
                        candle_core::Error::WithBacktrace { inner, .. } => inner.to_string(),
                        e => e.to_string(),
                    },
                })
            }
        }
    }
}

/// Parse `--devices` (each entry may itself be comma-separated). Empty: every CUDA device when
/// built with `cuda` (one CPU worker when none is found), else one CPU worker. `cpu` may be
/// repeated to run several CPU jobs at once.
pub fn parse_devices(list: &[String]) -> Result<Vec<DeviceSpec>, WorkerError> {
    let mut out = Vec::new();
    for item in list {
        for part in item.split(',').filter(|p| !p.trim().is_empty()) {
            out.push(part.parse()?);
        }
    }
    if out.is_empty() {
        out = default_devices();
    }
    if out.is_empty() {
        return Err(WorkerError::Empty);
    }
    Ok(out)
}

fn default_devices() -> Vec<DeviceSpec> {
    let mut found = Vec::new();
    if cfg!(feature = "cuda") {
        for n in 0..64 {
            if candle_core::Device::new_cuda(n).is_err() {
                break;
            }
            found.push(DeviceSpec::Cuda(n));
        }
    }
    if found.is_empty() {
        found.push(DeviceSpec::Cpu);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!(" CPU ".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert!(matches!(
            "tpu:0".parse::<DeviceSpec>(),
            Err(WorkerError::BadDevice(_))
        ));
        assert!(matches!(
            "cuda:x".parse::<DeviceSpec>(),
            Err(WorkerError::BadDevice(_))
        ));
        let cuda = "cuda:1".parse::<DeviceSpec>();
        if cfg!(feature = "cuda") {
            assert_eq!(cuda.unwrap(), DeviceSpec::Cuda(1));
        } else {
            let e = cuda.unwrap_err();
            assert!(matches!(e, WorkerError::NoCuda(_)));
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
        let list = parse_devices(&["cpu,cpu".into()]).unwrap();
        assert_eq!(list, vec![DeviceSpec::Cpu, DeviceSpec::Cpu]);
        if !cfg!(feature = "cuda") {
            assert_eq!(parse_devices(&[]).unwrap(), vec![DeviceSpec::Cpu]);
        }
    }
}
