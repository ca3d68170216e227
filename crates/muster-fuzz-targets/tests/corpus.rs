//! Replays every fuzz corpus (`fuzz/corpus/<target>/*`, seeds and any crash input found) through
//! its target's body, so the corpora are regression tests under plain `cargo test`, no nightly.

use std::path::{Path, PathBuf};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_replays_through_its_target() {
    let mut replayed = 0;
    for (name, body) in muster_fuzz_targets::TARGETS {
        let dir = corpus_root().join(name);
        let inputs = files(&dir);
        assert!(
            !inputs.is_empty(),
            "fuzz target {name} has no seed corpus in {}",
            dir.display()
        );
        for input in inputs {
            let data = std::fs::read(&input).expect("a corpus file reads");
            let run = std::panic::catch_unwind(|| body(&data));
            assert!(
                run.is_ok(),
                "fuzz target {name} fails on {}",
                input.display()
            );
            replayed += 1;
        }
    }
    assert!(replayed >= muster_fuzz_targets::TARGETS.len());
}

#[test]
fn every_corpus_and_target_file_belongs_to_a_target() {
    let names: Vec<&str> = muster_fuzz_targets::TARGETS
        .iter()
        .map(|(n, _)| *n)
        .collect();
    for entry in std::fs::read_dir(corpus_root()).expect("fuzz/corpus exists") {
        let name = entry.expect("a corpus folder").file_name();
        let name = name.to_string_lossy();
        assert!(
            names.contains(&name.as_ref()),
            "fuzz/corpus/{name} has no target in TARGETS"
        );
    }
    let targets = corpus_root().join("../fuzz_targets");
    for file in files(&targets) {
        let stem = file
            .file_stem()
            .expect("a file name")
            .to_string_lossy()
            .into_owned();
        assert!(
            names.contains(&stem.as_str()),
            "{} is not in TARGETS",
            file.display()
        );
        let source = std::fs::read_to_string(&file).expect("a target reads");
        assert!(
            source.contains(&format!("muster_fuzz_targets::{stem}(")),
            "{} does not call muster_fuzz_targets::{stem}",
            file.display()
        );
    }
    for name in names {
        assert!(
            targets.join(format!("{name}.rs")).is_file(),
            "no fuzz/fuzz_targets/{name}.rs"
        );
    }
}
