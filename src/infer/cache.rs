//! Loaded models, least recently used first out: at most `max_models` models and `max_bytes`
//! of resident weights. Each loaded model has its own [`Batcher`] thread; evicting or unloading
//! drops the cache's handle, and the thread ends once its in-flight requests are answered.

use super::batcher::{Batcher, BatcherConfig, BatcherStats};
use super::InferError;
use crate::config::Precision;
use candle_core::Device;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_models: usize,
    pub max_bytes: usize,
    /// Compute dtype; `None` = [`super::default_compute`] for the device.
    pub compute: Option<Precision>,
    pub batcher: BatcherConfig,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_models: 4,
            max_bytes: 4 << 30,
            compute: None,
            batcher: BatcherConfig::default(),
        }
    }
}

struct Entry {
    id: i64,
    batcher: Arc<Batcher>,
    last_used: Instant,
}

/// What the API shows of a loaded model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadedInfo {
    pub compute_dtype: String,
    pub resident_bytes: usize,
    pub batcher: BatcherStats,
}

pub struct ModelCache {
    device: Device,
    cfg: CacheConfig,
    entries: Mutex<Vec<Entry>>,
    /// Held while loading; also holds the ids of deleted models, so that a deletion waits for
    /// a load in progress and no load starts on a directory being removed.
    load_lock: Mutex<std::collections::HashSet<i64>>,
}

impl ModelCache {
    pub fn new(device: Device, cfg: CacheConfig) -> Self {
        Self {
            device,
            cfg,
            entries: Mutex::new(Vec::new()),
            load_lock: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// The loaded model `id`, marked as just used.
    pub fn get(&self, id: i64) -> Option<Arc<Batcher>> {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.iter_mut().find(|x| x.id == id).map(|x| {
            x.last_used = Instant::now();
            x.batcher.clone()
        })
    }

    /// The loaded model `id`, loading it from `dir` first when needed (blocking: reads and
    /// verifies the files; call it off the async runtime).
    pub fn get_or_load(&self, id: i64, dir: &Path) -> Result<Arc<Batcher>, InferError> {
        if let Some(b) = self.get(id) {
            return Ok(b);
        }
        let deleted = self.load_lock.lock().unwrap_or_else(|p| p.into_inner());
        if deleted.contains(&id) {
            return Err(InferError::Deleted(id));
        }
        if let Some(b) = self.get(id) {
            return Ok(b);
        }
        let t = super::engine::load(dir, &self.device, self.cfg.compute)?;
        let b = Arc::new(Batcher::spawn_boxed(t, self.cfg.batcher.clone()));
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.push(Entry {
            id,
            batcher: b.clone(),
            last_used: Instant::now(),
        });
        // evict least recently used others until within limits
        loop {
            let bytes: usize = e.iter().map(|x| x.batcher.resident_bytes()).sum();
            if e.len() <= 1 || (e.len() <= self.cfg.max_models && bytes <= self.cfg.max_bytes) {
                break;
            }
            let victim = e
                .iter()
                .enumerate()
                .filter(|(_, x)| x.id != id)
                .min_by_key(|(_, x)| x.last_used)
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    let gone = e.remove(i);
                    tracing::info!(model = gone.id, "unloaded (least recently used)");
                }
                None => break,
            }
        }
        tracing::info!(model = id, dir = %dir.display(), "loaded for translation");
        Ok(b)
    }

    /// Drop model `id` from the cache (after a delete). True when it was loaded.
    /// Score the exported model in `dir` on the TSV at `tsv` ([`super::evaluate_tsv`]) with a
    /// translator of its own on this cache's device, so serving is not held up by it.
    pub fn evaluate(
        &self,
        dir: &Path,
        tsv: &Path,
        beam_size: usize,
    ) -> Result<super::EvalReport, InferError> {
        let t = super::engine::load(dir, &self.device, self.cfg.compute)?;
        Ok(super::evaluate_tsv(t.as_ref(), tsv, beam_size, 32)?.0)
    }

    pub fn unload(&self, id: i64) -> bool {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let before = e.len();
        e.retain(|x| x.id != id);
        e.len() != before
    }

    /// Model `id` is being deleted: wait for a load of it in progress (blocking), drop it, and
    /// answer every later load with [`InferError::Deleted`]. Its files may go once this returns.
    pub fn forget(&self, id: i64) -> bool {
        let mut deleted = self.load_lock.lock().unwrap_or_else(|p| p.into_inner());
        deleted.insert(id);
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let before = e.len();
        e.retain(|x| x.id != id);
        e.len() != before
    }

    pub fn info(&self, id: i64) -> Option<LoadedInfo> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.iter().find(|x| x.id == id).map(|x| LoadedInfo {
            compute_dtype: x.batcher.compute.to_string(),
            resident_bytes: x.batcher.resident_bytes(),
            batcher: x.batcher.stats(),
        })
    }

    pub fn loaded_ids(&self) -> Vec<i64> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.iter().map(|x| x.id).collect()
    }
}
