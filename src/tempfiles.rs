//! Temporary files: names no two writers can share, and the sweep at start that removes what a
//! crash left behind (upload temps, half-written exports, `*.tmp` files, checkpoint files
//! whose sidecar was never written). Plain std, no tokio: the library and the server use it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `<prefix><name>-<pid>-<n>-<nanos>`: unique within this process (the counter) and across
/// processes (the pid), and unlikely to repeat across restarts (the clock).
pub fn unique_name(prefix: &str, name: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{name}-{}-{n}-{nanos}", std::process::id())
}

/// Why a path is a leftover, if it is one.
fn leftover(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_str()?;
    if name.starts_with(".upload-") {
        return Some("unfinished upload");
    }
    if name.contains(".partial-") {
        return Some("unfinished export");
    }
    if name.ends_with(".tmp") || name.ends_with(".tmp-write") {
        return Some("unfinished write");
    }
    let in_checkpoints = path
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "checkpoints");
    if in_checkpoints && name.ends_with(".safetensors") && !path.with_extension("json").exists() {
        return Some("checkpoint without a sidecar");
    }
    None
}

/// Remove the leftovers under `root` (down to `depth` levels), logging each. Run it while no
/// writer is active (at start, under the data directory lock). Returns what was removed.
pub fn sweep(root: &Path, depth: usize) -> Vec<(PathBuf, &'static str)> {
    let mut removed = Vec::new();
    sweep_into(root, depth, &mut removed);
    for (p, why) in &removed {
        tracing::warn!(path = %p.display(), "removed a leftover from a crash: {why}");
    }
    removed
}

fn sweep_into(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, &'static str)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if let Some(why) = leftover(&p) {
            let gone = if ft.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            match gone {
                Ok(()) => out.push((p, why)),
                Err(err) => tracing::warn!(path = %p.display(), "cannot remove a leftover: {err}"),
            }
        } else if ft.is_dir() && depth > 0 {
            sweep_into(&p, depth - 1, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_within_one_process() {
        assert_ne!(unique_name(".upload-", "a"), unique_name(".upload-", "a"));
    }

    #[test]
    fn the_sweep_removes_leftovers_and_keeps_everything_else() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let ck = root.join("runs/1/checkpoints");
        std::fs::create_dir_all(&ck).unwrap();
        std::fs::create_dir_all(root.join("corpora")).unwrap();
        std::fs::create_dir_all(root.join("models/.job1-best-1.partial-9-0-1")).unwrap();
        std::fs::create_dir_all(root.join("models/job1-best-1")).unwrap();
        for f in [
            "corpora/.upload-mine-1-0-5",
            "corpora/mine.en-it.tsv",
            "runs/1/spec.tmp-write",
            "runs/1/spec.json",
            "runs/1/checkpoints/step-00000010.safetensors",
            "runs/1/checkpoints/step-00000010.json",
            "runs/1/checkpoints/step-00000020.safetensors",
            "runs/1/checkpoints/step-00000030.safetensors.tmp",
            "models/job1-best-1/model.safetensors",
        ] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
        let mut gone: Vec<String> = sweep(root, 4)
            .into_iter()
            .map(|(p, _)| p.strip_prefix(root).unwrap().display().to_string())
            .collect();
        gone.sort();
        assert_eq!(
            gone,
            [
                "corpora/.upload-mine-1-0-5",
                "models/.job1-best-1.partial-9-0-1",
                "runs/1/checkpoints/step-00000020.safetensors",
                "runs/1/checkpoints/step-00000030.safetensors.tmp",
                "runs/1/spec.tmp-write",
            ]
        );
        for kept in [
            "corpora/mine.en-it.tsv",
            "runs/1/spec.json",
            "runs/1/checkpoints/step-00000010.safetensors",
            "models/job1-best-1/model.safetensors",
        ] {
            assert!(root.join(kept).exists(), "{kept}");
        }
    }
}
