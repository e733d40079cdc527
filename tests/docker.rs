//! The Dockerfile cannot be built here (no Docker daemon), so this checks what breaks it most
//! often: a file the build embeds or reads that no `COPY` brings into the build context.
//! Every `include_str!`/`include_bytes!` target, every `sqlx::migrate!` folder, every
//! `rerun-if-changed` input of build.rs and the manifest files must be copied into the build
//! stage's WORKDIR at the same relative path; the presets and the sample corpus must be copied
//! into the runtime stage where the binary looks for them (`AMPSERVE_CONFIGS_DIR` and `data/`
//! beside it); and `.dockerignore` must hide none of them. `scripts/docker-replay.sh` replays the
//! build and run steps from the same COPY lines.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One `FROM` stage: its `COPY` lines from the build context (sources relative to the context,
/// destinations made absolute with the WORKDIR in force at that line) and its `ENV` values.
#[derive(Debug, Default)]
struct Stage {
    name: Option<String>,
    copies: Vec<(PathBuf, PathBuf)>,
    env: Vec<(String, String)>,
    /// The WORKDIR at the end of the stage (where the image's process starts, for the last).
    workdir: PathBuf,
    /// The WORKDIR in force at `RUN ... cargo build`, if the stage builds.
    build_workdir: Option<PathBuf>,
}

/// Logical lines: comments dropped, `\` continuations joined.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') && cur.is_empty() {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(t);
            if !cur.trim().is_empty() {
                out.push(cur.trim().to_string());
            }
            cur.clear();
        }
    }
    out
}

fn parse_dockerfile(text: &str) -> Vec<Stage> {
    let mut stages: Vec<Stage> = Vec::new();
    let mut workdir = PathBuf::from("/");
    for line in logical_lines(text) {
        let (instr, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match instr.to_ascii_uppercase().as_str() {
            "FROM" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let name = words
                    .iter()
                    .position(|w| w.eq_ignore_ascii_case("AS"))
                    .map(|i| words[i + 1].to_string());
                stages.push(Stage {
                    name,
                    workdir: PathBuf::from("/"),
                    ..Stage::default()
                });
                workdir = PathBuf::from("/");
            }
            "WORKDIR" => {
                workdir = workdir.join(rest.trim());
                stages.last_mut().expect("WORKDIR before FROM").workdir = workdir.clone();
            }
            "RUN" if rest.contains("cargo build") => {
                stages.last_mut().expect("RUN before FROM").build_workdir = Some(workdir.clone());
            }
            "ENV" => {
                let stage = stages.last_mut().expect("ENV before FROM");
                for kv in rest.split_whitespace() {
                    if let Some((k, v)) = kv.split_once('=') {
                        stage.env.push((k.to_string(), v.to_string()));
                    }
                }
            }
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                if words.iter().any(|w| w.starts_with("--from")) {
                    continue;
                }
                let args: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
                let (dest, srcs) = args.split_last().expect("COPY needs a destination");
                let dest_dir = dest.ends_with('/') || srcs.len() > 1;
                let dest = workdir.join(dest);
                let stage = stages.last_mut().expect("COPY before FROM");
                for s in srcs {
                    let src = PathBuf::from(s.trim_end_matches('/'));
                    let to = if dest_dir {
                        dest.join(src.file_name().unwrap())
                    } else {
                        dest.clone()
                    };
                    stage.copies.push((src, normalize(&to)));
                }
            }
            _ => {}
        }
    }
    stages
}

/// `a/./b` and `a/b/` to `a/b` (no `..` in Dockerfile paths here).
fn normalize(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

/// Where a context path lands in the stage, if some COPY covers it.
fn copied_to(stage: &Stage, rel: &Path) -> Option<PathBuf> {
    stage.copies.iter().find_map(|(src, to)| {
        if src.as_os_str() == "." {
            return Some(to.join(rel));
        }
        rel.strip_prefix(src).ok().map(|tail| {
            if tail.as_os_str().is_empty() {
                to.clone()
            } else {
                to.join(tail)
            }
        })
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The string literal arguments of every `name!("...")` in `text`.
fn macro_args<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let pat = format!("{name}!(\"");
    text.match_indices(&pat)
        .filter_map(|(i, _)| {
            let rest = &text[i + pat.len()..];
            rest.find('"').map(|end| &rest[..end])
        })
        .collect()
}

/// Files and folders the compile reads, relative to the repository root.
fn build_inputs() -> BTreeSet<PathBuf> {
    let root = repo();
    let mut needed: BTreeSet<PathBuf> = ["Cargo.toml", "Cargo.lock", "build.rs", ".cargo", "src"]
        .iter()
        .map(PathBuf::from)
        .collect();
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let dir = f.parent().unwrap();
        for m in ["include_str", "include_bytes"] {
            for arg in macro_args(&text, m) {
                let abs = std::fs::canonicalize(dir.join(arg))
                    .unwrap_or_else(|e| panic!("{} embeds {arg}: {e}", f.display()));
                needed.insert(abs.strip_prefix(&root).unwrap().to_path_buf());
            }
        }
        // sqlx::migrate! paths are relative to the manifest directory.
        for arg in macro_args(&text, "sqlx::migrate") {
            needed.insert(normalize(Path::new(arg)));
        }
    }
    let build_rs = std::fs::read_to_string(root.join("build.rs")).unwrap();
    for line in build_rs.lines() {
        if let Some(i) = line.find("rerun-if-changed=") {
            let arg = line[i + "rerun-if-changed=".len()..].trim_end_matches(['"', ')', ';']);
            needed.insert(normalize(Path::new(arg)));
        }
    }
    needed
}

fn stages() -> Vec<Stage> {
    parse_dockerfile(&std::fs::read_to_string(repo().join("Dockerfile")).unwrap())
}

#[test]
fn every_file_the_compile_embeds_or_reads_is_copied_into_the_build_stage() {
    let st = stages();
    let build = st
        .iter()
        .find(|s| s.name.as_deref() == Some("build"))
        .expect("a stage named build");
    let wd = build
        .build_workdir
        .clone()
        .expect("the build stage runs cargo build");
    let needed = build_inputs();
    // build.rs embeds every file of static/ (the status page) and reruns when it changes.
    assert!(needed.contains(Path::new("static")), "{needed:?}");
    assert!(needed.contains(Path::new("migrations")), "{needed:?}");
    let mut missing = Vec::new();
    for rel in &needed {
        assert!(
            repo().join(rel).exists(),
            "{} does not exist",
            rel.display()
        );
        match copied_to(build, rel) {
            Some(to) if to == wd.join(rel) => {}
            other => missing.push(format!("{} (lands at {other:?})", rel.display())),
        }
    }
    assert!(
        missing.is_empty(),
        "not copied to {} in the build stage: {missing:?}",
        wd.display()
    );
}

#[test]
fn the_runtime_stage_holds_the_presets_and_the_sample_corpus_where_the_server_looks() {
    let st = stages();
    let runtime = st.last().unwrap();
    let configs_dir = runtime
        .env
        .iter()
        .find(|(k, _)| k == "AMPSERVE_CONFIGS_DIR")
        .map(|(_, v)| PathBuf::from(v))
        .expect("the runtime stage sets AMPSERVE_CONFIGS_DIR");
    // What `serve` reads by default: the presets, and the bundled data root `data` relative to
    // the working directory.
    let data_dir = runtime.workdir.join(ampserve::config::BUNDLED_DATA_DIR);
    let mut checked = 0;
    for dir in ["configs", "data"] {
        let mut files = Vec::new();
        list_files(&repo().join(dir), &mut files);
        for f in files {
            let rel = f.strip_prefix(repo()).unwrap();
            let want = if dir == "configs" {
                configs_dir.join(rel.strip_prefix("configs").unwrap())
            } else {
                data_dir.join(rel.strip_prefix("data").unwrap())
            };
            assert_eq!(
                copied_to(runtime, rel).as_ref(),
                Some(&want),
                "{}",
                rel.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 7, "three presets, three splits and their notes");
}

fn list_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            list_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// `.dockerignore` patterns as Docker reads them: relative to the context root, `*` within one
/// path segment, a leading `!` re-including (not used here, so rejected to keep this simple).
fn ignored(rel: &Path, patterns: &[String]) -> Option<String> {
    let rel_s = rel.to_string_lossy();
    patterns.iter().find_map(|p| {
        let hit = if let Some(suffix) = p.strip_prefix('*') {
            rel.components()
                .any(|c| c.as_os_str().to_string_lossy().ends_with(suffix))
        } else {
            rel_s == p.as_str() || rel_s.starts_with(&format!("{p}/"))
        };
        hit.then(|| p.clone())
    })
}

#[test]
fn dockerignore_hides_nothing_a_copy_needs_and_keeps_build_output_out() {
    let text = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let patterns: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_string())
        .collect();
    assert!(patterns.iter().all(|p| !p.starts_with('!')), "{patterns:?}");
    for heavy in ["target", ".git", "ampserve-data"] {
        assert!(
            ignored(Path::new(heavy), &patterns).is_some(),
            "{heavy} should not be sent as build context"
        );
    }
    let mut inputs: Vec<PathBuf> = build_inputs().into_iter().collect();
    for dir in ["src", "static", "migrations", "configs", "data", ".cargo"] {
        let mut files = Vec::new();
        list_files(&repo().join(dir), &mut files);
        inputs.extend(
            files
                .iter()
                .map(|f| f.strip_prefix(repo()).unwrap().to_path_buf()),
        );
    }
    for rel in inputs {
        assert_eq!(ignored(&rel, &patterns), None, "{}", rel.display());
    }
}

#[test]
fn the_cuda_variant_names_the_cuda_release_build_cuda_sh_pins() {
    let docker = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let script = std::fs::read_to_string(repo().join("scripts/build-cuda.sh")).unwrap();
    // build-cuda.sh installs nvidia-cuda-runtime==13.0.x: the images must be CUDA 13.0.
    let pinned = script
        .split("nvidia-cuda-runtime==")
        .nth(1)
        .expect("build-cuda.sh pins nvidia-cuda-runtime");
    let major_minor: String = pinned.split('.').take(2).collect::<Vec<_>>().join(".");
    assert_eq!(major_minor, "13.0");
    let images: Vec<&str> = docker
        .split_whitespace()
        .filter_map(|w| w.split("=nvidia/cuda:").nth(1))
        .collect();
    assert_eq!(images.len(), 2, "a devel and a runtime image: {images:?}");
    for tag in images {
        assert!(
            tag.starts_with(&format!("{major_minor}.")),
            "nvidia/cuda:{tag} is not CUDA {major_minor}"
        );
    }
}
