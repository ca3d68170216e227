//! The server's layers import downward only (lib.rs's table, DESIGN.md section 14): every
//! `crate::…` path in a file is checked against what its layer may use, and `store/` has
//! no `tonic`. A new file lands in a layer by its folder; a new top-level module must be
//! given a row here.

use std::path::{Path, PathBuf};

/// A layer (a folder, or a top-level file) and the layers it may import.
const RULES: &[(&str, &[&str])] = &[
    ("metrics", &[]),
    ("tls", &[]),
    ("listener", &["tls"]),
    ("store", &[]),
    ("coordinator", &[]),
    ("views", &["coordinator", "store"]),
    ("effects", &["coordinator", "store", "views"]),
    (
        "leader",
        &["effects", "views", "coordinator", "store", "metrics"],
    ),
    (
        "grpc",
        &[
            "effects",
            "views",
            "coordinator",
            "store",
            "metrics",
            "listener",
            "tls",
        ],
    ),
    (
        "web",
        &[
            "effects",
            "views",
            "coordinator",
            "store",
            "metrics",
            "listener",
        ],
    ),
    // The composition root and the crate root may name every layer.
    ("server", &["*"]),
    ("lib", &["*"]),
];

/// What every layer above the coordinator and the store may import: the composition
/// root's `Server` (its fields are the handles of the layers below).
const ABOVE_BASE: &[&str] = &["server"];

/// The bottom layers, which name no other layer (the config type is plain data).
const BASE: &[&str] = &["metrics", "store", "coordinator", "listener", "tls"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn layer_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The layers a file names through `crate::X` (outside comments).
fn imports(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

#[test]
fn server_layers_import_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "found the server's sources");
    let mut violations = Vec::new();
    for file in &files {
        let layer = layer_of(&src, file);
        let Some((_, allowed)) = RULES.iter().find(|(l, _)| *l == layer) else {
            violations.push(format!(
                "{}: layer {layer:?} has no row in tests/layers.rs",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for name in imports(&text) {
            let ok = name == layer
                || name == "ServerConfig"
                || (!BASE.contains(&layer.as_str()) && ABOVE_BASE.contains(&name.as_str()))
                || allowed.contains(&"*")
                || allowed.contains(&name.as_str());
            if !ok {
                violations.push(format!(
                    "{}: layer {layer} imports crate::{name}",
                    file.display()
                ));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_store_knows_no_transport() {
    let store = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store");
    let mut files = Vec::new();
    sources(&store, &mut files);
    assert!(!files.is_empty());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for banned in [
            "tonic",
            "Coordinator",
            "axum",
            "crate::grpc",
            "crate::coordinator",
        ] {
            assert!(
                !code.contains(banned),
                "{} mentions {banned}: the store answers with StoreError and reaches peers through BlobPeers",
                file.display()
            );
        }
    }
}
