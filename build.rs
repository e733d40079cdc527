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

fn main() {
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
