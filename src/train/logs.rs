//! The run directory's JSONL logs (`metrics.jsonl`, one line per step; `validations.jsonl`, one
//! per validation). A resume or a recovery rewrites history from a checkpoint on, so opening the
//! logs first drops the lines after that step: the files never hold a step twice.

use crate::checkpoint;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

pub(super) const METRICS: &str = "metrics.jsonl";
pub(super) const VALIDATIONS: &str = "validations.jsonl";

/// Keep only the JSONL lines whose `step` is <= `max_step` (a resumed run replaces, not
/// duplicates, what came after its checkpoint).
fn truncate_jsonl(path: &Path, max_step: u64) -> std::io::Result<()> {
    let Ok(f) = fs::File::open(path) else {
        return Ok(());
    };
    let mut kept = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line?;
        let step = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        if matches!(step, Some(s) if s <= max_step) {
            kept.extend_from_slice(line.as_bytes());
            kept.push(b'\n');
        }
    }
    checkpoint::write_atomic(path, &kept)
}

/// One append-only JSONL file; a line that fails to serialize or write is dropped (the database
/// and the events are the record, the logs a convenience).
pub(super) struct Jsonl(fs::File);

impl Jsonl {
    fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ))
    }

    pub(super) fn write<T: serde::Serialize>(&mut self, v: &T) {
        if let Ok(mut s) = serde_json::to_vec(v) {
            s.push(b'\n');
            let _ = self.0.write_all(&s);
        }
    }
}

/// Both logs of a run directory.
pub(super) struct RunLogs {
    pub(super) metrics: Jsonl,
    pub(super) validations: Jsonl,
}

impl RunLogs {
    /// Open the logs in `dir` for appending after `step` (lines after it are dropped first).
    pub(super) fn open_after(dir: &Path, step: u64) -> std::io::Result<Self> {
        for f in [METRICS, VALIDATIONS] {
            truncate_jsonl(&dir.join(f), step)?;
        }
        Ok(Self {
            metrics: Jsonl::open(&dir.join(METRICS))?,
            validations: Jsonl::open(&dir.join(VALIDATIONS))?,
        })
    }
}
