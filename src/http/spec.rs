//! Turn a `POST /api/jobs` body into a validated [`TrainSpec`]: optional `config` preset
//! (a TOML file in `configs/`) deep-merged under the JSON, serde errors mapped to 400/422 with
//! the field's dotted path, ranges checked by `TrainSpec::validate`, and corpus paths confined
//! to the data roots.

use super::{ApiError, ApiResult, Settings};
use crate::config::TrainSpec;
use crate::store::nodes::DeviceKind;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub const MIN_PRIORITY: i64 = -1000;
pub const MAX_PRIORITY: i64 = 1000;

/// A validated job request.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub spec: TrainSpec,
    pub priority: i64,
    /// `"device": "cpu" | "cuda"`: only nodes with such a device claim the job.
    pub requires_device: Option<DeviceKind>,
}

pub fn parse_job_request(body: &[u8], settings: &Settings) -> ApiResult<JobRequest> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::malformed_json(
            "empty body: expected a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::malformed_json(format!("malformed JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(ApiError::invalid("body", "expected a JSON object"));
    };
    let priority = match obj.remove("priority") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(p) if (MIN_PRIORITY..=MAX_PRIORITY).contains(&p) => p,
            _ => {
                return Err(ApiError::invalid(
                    "priority",
                    format!(
                        "{n} is out of range; allowed integers {MIN_PRIORITY}..={MAX_PRIORITY}"
                    ),
                ))
            }
        },
        Some(other) => {
            return Err(ApiError::invalid(
                "priority",
                format!("expected an integer, got {}", kind(&other)),
            ))
        }
    };
    let requires_device = match obj.remove("device") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(DeviceKind::parse(&d).ok_or_else(|| {
            ApiError::invalid(
                "device",
                format!("unknown device kind `{d}`; one of cpu, cuda (or leave it out: any)"),
            )
        })?),
        Some(other) => {
            return Err(ApiError::invalid(
                "device",
                format!("expected \"cpu\" or \"cuda\", got {}", kind(&other)),
            ))
        }
    };
    let base = match obj.remove("config") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(load_preset(&name, &settings.configs_dir)?),
        Some(other) => {
            return Err(ApiError::invalid(
                "config",
                format!("expected a preset name, got {}", kind(&other)),
            ))
        }
    };
    require_objects(&obj, &spec_shape(), "")?;
    let from_preset = base.is_some();
    let mut merged = base.unwrap_or_else(|| Value::Object(Map::new()));
    deep_merge(&mut merged, Value::Object(obj));

    let mut spec: TrainSpec =
        serde_path_to_error::deserialize(merged).map_err(serde_field_error)?;
    if from_preset {
        spec.resolve_paths(&settings.configs_dir);
    }
    spec.validate()
        .map_err(|e| ApiError::invalid(e.field.clone(), e.message.clone()))?;
    spec.data.train = confine(&spec.data.train, &settings.data_roots, "data.train")?;
    if let Some(p) = spec.data.train_tgt.take() {
        spec.data.train_tgt = Some(confine(&p, &settings.data_roots, "data.train_tgt")?);
    }
    if let Some(p) = spec.data.valid.take() {
        spec.data.valid = Some(confine(&p, &settings.data_roots, "data.valid")?);
    }
    Ok(JobRequest {
        spec,
        priority,
        requires_device,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The default spec as JSON: where it holds an object, a request must give an object too.
fn spec_shape() -> Value {
    serde_json::to_value(TrainSpec::default()).unwrap_or(Value::Null)
}

/// serde's derived struct visitors also accept a sequence and fill the fields by position
/// (`"model": [48, 1, 2, 96]`, and `"model": []` gives all defaults), so every section the
/// schema has as an object must be an object in the request. Checked before the preset merge,
/// which would otherwise let a non-object replace the preset's section.
fn require_objects(obj: &Map<String, Value>, shape: &Value, prefix: &str) -> ApiResult<()> {
    let Value::Object(shape) = shape else {
        return Ok(());
    };
    for (key, v) in obj {
        let Some(want @ Value::Object(_)) = shape.get(key) else {
            continue;
        };
        let field = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match v {
            Value::Object(inner) => require_objects(inner, want, &field)?,
            other => {
                return Err(ApiError::invalid(
                    field,
                    format!("expected an object, got {}", kind(other)),
                ))
            }
        }
    }
    Ok(())
}

/// The preset `configs/<name>.toml` as JSON.
fn load_preset(name: &str, dir: &Path) -> ApiResult<Value> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let path = dir.join(format!("{name}.toml"));
    if !ok || !path.is_file() {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let p = e.path();
                        (p.extension()? == "toml")
                            .then(|| p.file_stem()?.to_str().map(str::to_string))?
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        return Err(ApiError::invalid(
            "config",
            format!("unknown config `{name}`; available: {}", names.join(", ")),
        ));
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ApiError::internal(format!("cannot read {}: {e}", path.display())))?;
    let table: toml::Value = toml::from_str(&text)
        .map_err(|e| ApiError::internal(format!("preset {} is invalid: {e}", path.display())))?;
    serde_json::to_value(table).map_err(|e| ApiError::internal(e.to_string()))
}

pub use crate::spec_overrides::deep_merge;

/// 422 naming the dotted field: the unknown key itself for `deny_unknown_fields`, else the
/// path serde was at (wrong type, bad enum variant, ...).
pub(super) fn serde_field_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner().to_string();
    let mut field = if path == "." { String::new() } else { path };
    if let Some(rest) = inner.strip_prefix("unknown field `") {
        if let Some(name) = rest.split('`').next() {
            // serde_path_to_error stops at the parent for unknown keys.
            if !field.ends_with(name) {
                field = if field.is_empty() {
                    name.to_string()
                } else {
                    format!("{field}.{name}")
                };
            }
        }
    }
    if field.is_empty() {
        field = "body".into();
    }
    ApiError::invalid(field, inner)
}

/// Resolve a corpus path and require it to lie inside one of the (canonical) data roots.
/// Symlinks and `..` are resolved first, so neither can escape. Relative paths are tried
/// against the working directory, then against each root. Every refusal has the same message:
/// it neither echoes server paths nor tells a file that exists outside the roots from one that
/// does not exist.
pub fn confine(path: &Path, roots: &[PathBuf], field: &str) -> ApiResult<PathBuf> {
    let mut candidates = Vec::new();
    candidates.push(path.to_path_buf());
    if path.is_relative() {
        candidates.extend(roots.iter().map(|r| r.join(path)));
    }
    for c in candidates {
        let Ok(canon) = std::fs::canonicalize(&c) else {
            continue;
        };
        if roots.iter().any(|r| canon.starts_with(r)) && canon.is_file() {
            return Ok(canon);
        }
    }
    Err(ApiError::invalid(
        field,
        "not an allowed corpus file: name a file inside a data root (an uploaded corpus by its \
         file name, or a path relative to a data root)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deep_merge_overrides_leaves_only() {
        let mut base = json!({"model": {"d_model": 128, "layers": 2}, "name": "a"});
        deep_merge(
            &mut base,
            json!({"model": {"layers": 1}, "train": {"lr": 0.1}}),
        );
        assert_eq!(
            base,
            json!({"model": {"d_model": 128, "layers": 1}, "name": "a", "train": {"lr": 0.1}})
        );
    }

    #[test]
    fn confine_rejects_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("ok.tsv"), "a\tb\n").unwrap();
        std::fs::write(outside.join("secret.tsv"), "a\tb\n").unwrap();
        std::os::unix::fs::symlink(outside.join("secret.tsv"), root.join("link.tsv")).unwrap();
        let roots = vec![std::fs::canonicalize(&root).unwrap()];

        let ok = confine(&root.join("ok.tsv"), &roots, "data.train").unwrap();
        assert_eq!(ok, roots[0].join("ok.tsv"));
        // Relative to a root.
        assert_eq!(
            confine(Path::new("ok.tsv"), &roots, "data.train").unwrap(),
            ok
        );
        for bad in [
            outside.join("secret.tsv"),
            root.join("../outside/secret.tsv"),
            root.join("link.tsv"),
            PathBuf::from("../outside/secret.tsv"),
        ] {
            let e = confine(&bad, &roots, "data.train").unwrap_err();
            assert_eq!(e.status, 422, "{}", bad.display());
            assert_eq!(e.field.as_deref(), Some("data.train"));
        }
        let missing = confine(&root.join("missing.tsv"), &roots, "data.valid").unwrap_err();
        assert_eq!(missing.field.as_deref(), Some("data.valid"));
        let outside_err = confine(&outside.join("secret.tsv"), &roots, "data.valid").unwrap_err();
        assert_eq!(missing.message, outside_err.message, "no existence hint");
        assert!(!missing.message.contains('/'), "{}", missing.message);
    }
}
