//! The crates import downward only (DESIGN.md sections 3 and 14): the client commands and
//! the client crate link neither daemon, and the daemons do not link each other. Read
//! from `cargo metadata`, so a new dependency that breaks the layering fails here.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Every workspace package's dependencies (all kinds: normal, dev and build).
fn dependencies() -> BTreeMap<String, Vec<String>> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .map(|d| d["name"].as_str().expect("a name").to_string())
                .collect();
            (p["name"].as_str().expect("a name").to_string(), deps)
        })
        .collect()
}

#[test]
fn the_client_side_links_no_daemon_and_the_daemons_not_each_other() {
    let deps = dependencies();
    let forbidden: [(&str, &[&str]); 5] = [
        ("muster-cli", &["muster-agent", "muster-server", "muster"]),
        (
            "muster-client",
            &[
                "muster-agent",
                "muster-server",
                "muster-cli",
                "muster-core",
                "muster",
            ],
        ),
        // The engine helpers know nothing of muster's own crates.
        (
            "muster-docker",
            &[
                "muster-agent",
                "muster-server",
                "muster-cli",
                "muster-client",
                "muster-core",
                "muster-proto",
                "muster",
            ],
        ),
        ("muster-agent", &["muster-server", "muster-cli", "muster"]),
        ("muster-server", &["muster-agent", "muster-cli", "muster"]),
    ];
    for (package, not) in forbidden {
        let has = deps
            .get(package)
            .unwrap_or_else(|| panic!("{package} is a workspace package"));
        let bad: Vec<&&str> = not.iter().filter(|n| has.iter().any(|d| d == *n)).collect();
        assert!(bad.is_empty(), "{package} depends on {bad:?}: {has:?}");
    }
    // The one binary is where the layers meet.
    let muster = &deps["muster"];
    for needed in ["muster-cli", "muster-server", "muster-agent"] {
        assert!(muster.iter().any(|d| d == needed), "muster lacks {needed}");
    }
    // The agent and the CLI share the one client crate, and both daemons the one set of
    // Docker engine helpers.
    for (user, shared) in [
        ("muster-cli", "muster-client"),
        ("muster-agent", "muster-client"),
        ("muster-agent", "muster-docker"),
        ("muster-server", "muster-docker"),
    ] {
        assert!(
            deps[user].iter().any(|d| d == shared),
            "{user} does not use {shared}"
        );
    }
}
