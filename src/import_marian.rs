//! `ampserve models import-marian DIR --name NAME --src-lang fr --tgt-lang en`: bring a
//! pretrained MarianMT checkpoint (OPUS-MT, safetensors + `tokenizer.json`) into a data
//! directory's models area, so the server lists it (kind `marian`) and translates with it like
//! any exported model. Offline: the files are checked, copied and checksummed
//! ([`crate::infer::marian::import`]), then recorded in the `models` table. The CLI takes the
//! data directory's lock, so it runs while the server is stopped; tests and embedders call
//! [`import_into`] with a store they already hold.

use crate::data_dir_lock::{self, LockError};
use crate::infer::{self, InferError, MarianImport};
use crate::store::{ModelRow, Store};
use anyhow::Context;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct ImportMarianArgs {
    /// Checkpoint directory: config.json (candle's marian::Config), model.safetensors, and
    /// src_tokenizer.json + tgt_tokenizer.json (or one shared tokenizer.json)
    pub dir: PathBuf,
    /// Name in the model list
    #[arg(long)]
    pub name: String,
    /// Source language code shown in the model list (e.g. fr)
    #[arg(long)]
    pub src_lang: String,
    /// Target language code (e.g. en)
    #[arg(long)]
    pub tgt_lang: String,
    /// Source tokenizer.json elsewhere (e.g. candle's tokenizer-marian-base-fr.json)
    #[arg(long, value_name = "FILE")]
    pub src_tokenizer: Option<PathBuf>,
    /// Target tokenizer.json elsewhere (e.g. tokenizer-marian-base-en.json)
    #[arg(long, value_name = "FILE")]
    pub tgt_tokenizer: Option<PathBuf>,
    /// The server's data directory
    #[arg(long, env = "AMPSERVE_DATA_DIR", default_value = "./ampserve-data")]
    pub data_dir: PathBuf,
}

impl ImportMarianArgs {
    pub fn request(&self) -> MarianImport {
        MarianImport {
            dir: self.dir.clone(),
            name: self.name.clone(),
            src_lang: self.src_lang.clone(),
            tgt_lang: self.tgt_lang.clone(),
            src_tokenizer: self.src_tokenizer.clone(),
            tgt_tokenizer: self.tgt_tokenizer.clone(),
        }
    }
}

/// Copy the checkpoint into `models_dir/<name>-...` and insert its `models` row.
pub async fn import_into(
    store: &Store,
    models_dir: &Path,
    req: MarianImport,
) -> anyhow::Result<ModelRow> {
    let safe: String = req
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    let out = models_dir.join(crate::tempfiles::unique_name("marian-", &safe));
    let out2 = out.clone();
    let manifest = tokio::task::spawn_blocking(move || infer::marian::import(&req, &out2))
        .await
        .context("the import task failed")??;
    let row = crate::worker::model_row(&manifest, None, &out);
    match store.insert_model(&row).await {
        Ok(r) => Ok(r),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&out);
            Err(anyhow::anyhow!("cannot record the model: {e}"))
        }
    }
}

/// The CLI: lock the data directory (the server must not be running on it), import, print
/// the new row as JSON.
pub fn run(a: ImportMarianArgs) -> anyhow::Result<()> {
    let lock = data_dir_lock::lock(&a.data_dir).map_err(|e| match e {
        LockError::Busy { dir, source } => anyhow::anyhow!(
            "a server is using the data directory {} ({source}): stop it, import, start it again",
            dir.display()
        ),
        e => e.into(),
    })?;
    let data_dir = lock.dir.clone();
    let req = a.request();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let store = Store::open(&data_dir.join("ampserve.db")).await?;
            let row = import_into(&store, &data_dir.join("models"), req)
                .await
                .map_err(|e| match e.downcast::<InferError>() {
                    Ok(e) => anyhow::anyhow!("cannot import: {e}"),
                    Err(e) => e,
                })?;
            eprintln!(
                "imported Marian model {} `{}` ({} {}->{}, {} parameters) into {}",
                row.id, row.name, row.dtype, row.src_lang, row.tgt_lang, row.params, row.path
            );
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "id": row.id, "name": row.name, "kind": "marian", "path": row.path,
                    "src_lang": row.src_lang, "tgt_lang": row.tgt_lang, "params": row.params,
                }))?
            );
            Ok(())
        })
}
