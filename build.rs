// Re-embed the SQL migrations (`sqlx::migrate!`) whenever one is added, and list the files of
// `static/` for the status page: `$OUT_DIR/static_assets.rs` holds one `Asset` per file
// (include_bytes!, content type by extension), so a new page module needs no hand-written entry
// in src/http/page.rs. The folder stays flat: `/static/{file}` serves one path segment.
use std::fmt::Write as _;
use std::path::Path;

fn content_type(name: &str) -> Option<&'static str> {
    Some(match name.rsplit_once('.')?.1 {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        _ => return None,
    })
}

/// With the `cuda` feature: compile every `src/kernels/cuda/*.cu` to `$OUT_DIR/<name>.ptx` for
/// `CUDA_COMPUTE_CAP` (default 90, Hopper) with the toolkit's nvcc (`$NVCC`, else
/// `$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH), so a build without a GPU still catches every
/// compile error of the kernels. The default CPU build never runs nvcc.
fn build_cuda_kernels() {
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=src/kernels/cuda");
    for v in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let nvcc = std::env::var("NVCC").ok().unwrap_or_else(|| {
        std::env::var("CUDA_HOME")
            .ok()
            .map(|h| Path::new(&h).join("bin").join("nvcc"))
            .filter(|p| p.exists())
            .map_or_else(|| "nvcc".to_string(), |p| p.display().to_string())
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.trim().trim_start_matches("sm_");
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let src = Path::new(&root).join("src/kernels/cuda");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let mut sources: Vec<_> = std::fs::read_dir(&src)
        .expect("src/kernels/cuda is readable")
        .map(|e| e.expect("src/kernels/cuda entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for cu in sources {
        let stem = cu
            .file_stem()
            .expect("a .cu file name")
            .to_string_lossy()
            .to_string();
        let ptx = Path::new(&out).join(format!("{stem}.ptx"));
        let output = std::process::Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch=sm_{cap}"))
            .arg("-I")
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .arg(&cu)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} (set NVCC or CUDA_HOME): {e}"));
        assert!(
            output.status.success(),
            "nvcc failed on {}:\n{}{}",
            cu.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn main() {
    build_cuda_kernels();
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=static");
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&root).join("static");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("static/ is readable") {
        let entry = entry.expect("static/ entry");
        let name = entry
            .file_name()
            .into_string()
            .expect("static/ file names are UTF-8");
        if name.starts_with('.') {
            continue; // editor and OS droppings
        }
        assert!(
            entry.file_type().expect("file type").is_file(),
            "static/{name}: static/ must stay flat (the page serves /static/<file>)"
        );
        names.push(name);
    }
    names.sort();
    let mut out = String::from("&[\n");
    for name in &names {
        let ctype = content_type(name).unwrap_or_else(|| {
            panic!("static/{name}: no content type for this extension; add one in build.rs")
        });
        let path = dir.join(name);
        writeln!(
            out,
            "    Asset {{ name: {name:?}, content_type: {ctype:?}, body: include_bytes!({:?}) }},",
            path.display().to_string()
        )
        .unwrap();
    }
    out.push(']');
    let dest =
        Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("static_assets.rs");
    std::fs::write(dest, out).expect("write static_assets.rs");
}
