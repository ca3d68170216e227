//! Local data inputs travel with the submit: a data input whose `path` is a file or
//! folder on the submitting machine (relative to the YAML file) is snapshotted like code,
//! uploaded, and named by its manifest as `muster-blob://MANIFEST[/FILE]`, which core
//! places at `inputs/NAME/` on the node. One rule for `run submit` (a parsed job file)
//! and for the sweep and pipeline files (rewritten as YAML, since the server parses them).

use std::path::{Path, PathBuf};

use anyhow::Context;
use muster_core::spec::{BLOB_SCHEME, InputFile, JobFile};

use crate::snapshot::{self, Snapshot};

/// A local input found and snapshotted: where it was named (`inputs.NAME` or
/// `jobs.STEP.inputs.NAME`), the path on this machine, and its snapshot to upload.
#[derive(Debug)]
pub struct LocalInput {
    /// The YAML path of the input.
    pub field: String,
    /// The file or folder on this machine.
    pub path: PathBuf,
    /// What to upload.
    pub snapshot: Snapshot,
}

/// Whether `path` names something on this machine (not a URL, asset, datastore or binding).
fn is_local(path: &str) -> bool {
    !(path.contains("://") || path.starts_with("azureml:") || path.contains("${{"))
}

/// Snapshots the local `path` of input `field` (`kind` its `type:`), relative to `base`,
/// and returns the path that replaces it with the snapshot; `None` when it is not local.
fn snapshot_one(
    field: &str,
    path: &str,
    kind: Option<&str>,
    base: &Path,
) -> anyhow::Result<Option<(String, LocalInput)>> {
    if !is_local(path) {
        return Ok(None);
    }
    let local = base.join(path);
    let meta = std::fs::metadata(&local).with_context(|| {
        format!(
            "{field}.path: {} does not exist: give a file or folder relative to the YAML file, or an https URL",
            local.display()
        )
    })?;
    let wants_file = kind == Some("uri_file");
    let snap = match (meta.is_dir(), wants_file) {
        (true, false) => {
            snapshot::build(&local, snapshot::DATA_LIMITS).with_context(|| field.to_string())?
        }
        (false, true) => snapshot::file_snapshot(&local).with_context(|| field.to_string())?,
        (true, true) => anyhow::bail!(
            "{field}: {} is a folder, but the input is a uri_file: name a file, or use type: uri_folder",
            local.display()
        ),
        (false, false) => anyhow::bail!(
            "{field}: {} is a file, but the input is a uri_folder: use type: uri_file",
            local.display()
        ),
    };
    let manifest = snapshot::manifest_sha(&snap)?;
    let rewritten = match snap.manifest.files.first().filter(|_| wants_file) {
        Some(f) => format!("{BLOB_SCHEME}{manifest}/{}", f.path),
        None => format!("{BLOB_SCHEME}{manifest}"),
    };
    Ok(Some((
        rewritten,
        LocalInput {
            field: field.to_string(),
            path: local,
            snapshot: snap,
        },
    )))
}

/// Snapshots each local data input of a parsed job file, rewriting its path.
pub fn in_job(job: &mut JobFile, base: &Path) -> anyhow::Result<Vec<LocalInput>> {
    let mut out = Vec::new();
    for (name, input) in job.inputs.iter_mut().flatten() {
        let InputFile::Data(d) = input else { continue };
        let Some(path) = d.path.clone() else { continue };
        let field = format!("inputs.{name}");
        if let Some((rewritten, found)) = snapshot_one(&field, &path, d.kind.as_deref(), base)? {
            d.path = Some(rewritten);
            out.push(found);
        }
    }
    Ok(out)
}

/// Snapshots each local data input anywhere in a sweep or pipeline YAML (every
/// `inputs:` mapping whose entries carry a `path:`: the file's own, a trial's, each
/// step's), rewriting its path. The text comes back unchanged when it names none, so the
/// server's errors keep their line numbers.
pub fn in_yaml(text: &str, base: &Path) -> anyhow::Result<(String, Vec<LocalInput>)> {
    fn walk(
        v: &mut yaml_serde::Value,
        at: &str,
        base: &Path,
        out: &mut Vec<LocalInput>,
    ) -> anyhow::Result<()> {
        match v {
            yaml_serde::Value::Mapping(m) => {
                for (key, value) in m.iter_mut() {
                    let key = key.as_str().unwrap_or_default().to_string();
                    let here = if at.is_empty() {
                        key.clone()
                    } else {
                        format!("{at}.{key}")
                    };
                    if key == "inputs"
                        && let Some(inputs) = value.as_mapping_mut()
                    {
                        for (name, input) in inputs.iter_mut() {
                            let field = format!("{here}.{}", name.as_str().unwrap_or_default());
                            let Some(entry) = input.as_mapping_mut() else {
                                continue;
                            };
                            let Some(path) = entry.get("path").and_then(|p| p.as_str()) else {
                                continue;
                            };
                            let kind = entry.get("type").and_then(|k| k.as_str());
                            if let Some((rewritten, found)) =
                                snapshot_one(&field, path, kind, base)?
                            {
                                entry.insert("path".into(), rewritten.into());
                                out.push(found);
                            }
                        }
                    } else {
                        walk(value, &here, base, out)?;
                    }
                }
            }
            yaml_serde::Value::Sequence(s) => {
                for v in s {
                    walk(v, at, base, out)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    // The server's parse reports a file over the limits or not YAML.
    if muster_core::spec::check_yaml_limits(text).is_err() {
        return Ok((text.to_string(), Vec::new()));
    }
    let Ok(mut doc) = yaml_serde::from_str::<yaml_serde::Value>(text) else {
        return Ok((text.to_string(), Vec::new()));
    };
    let mut out = Vec::new();
    walk(&mut doc, "", base, &mut out)?;
    if out.is_empty() {
        return Ok((text.to_string(), out));
    }
    Ok((yaml_serde::to_string(&doc)?, out))
}

/// Says on stderr what each local input's upload sent, beside the code's line.
pub fn describe(
    inputs: &[LocalInput],
    uploaded: impl IntoIterator<Item = (muster_core::spec::CodeRef, snapshot::UploadStats)>,
) {
    for (input, (stored, stats)) in inputs.iter().zip(uploaded) {
        let what = format!(" ({})", input.field);
        eprintln!(
            "{}",
            snapshot::describe(&input.path, &what, &stored, &stats)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_local_input_of_a_pipeline_is_snapshotted_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("raw")).unwrap();
        std::fs::write(dir.path().join("raw/a.csv"), "1,2\n").unwrap();
        std::fs::write(dir.path().join("lr.txt"), "0.1\n").unwrap();
        let text = "\
type: pipeline
inputs:
  raw: {type: uri_folder, path: ./raw}
  site: {type: uri_file, path: https://example.org/x.csv}
jobs:
  a:
    command: cat ${{inputs.lr}}
    inputs:
      lr: {type: uri_file, path: lr.txt}
      raw: ${{parent.inputs.raw}}
      n: 3
";
        let (out, found) = in_yaml(text, dir.path()).unwrap();
        let fields: Vec<_> = found.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["inputs.raw", "jobs.a.inputs.lr"]);
        let doc: yaml_serde::Value = yaml_serde::from_str(&out).unwrap();
        let raw = doc["inputs"]["raw"]["path"].as_str().unwrap();
        assert!(raw.starts_with(BLOB_SCHEME) && !raw[BLOB_SCHEME.len()..].contains('/'));
        let lr = doc["jobs"]["a"]["inputs"]["lr"]["path"].as_str().unwrap();
        assert!(
            lr.starts_with(BLOB_SCHEME) && lr.ends_with("/lr.txt"),
            "{lr}"
        );
        assert_eq!(
            doc["inputs"]["site"]["path"].as_str(),
            Some("https://example.org/x.csv")
        );
        assert_eq!(
            doc["jobs"]["a"]["inputs"]["raw"].as_str(),
            Some("${{parent.inputs.raw}}")
        );
    }

    #[test]
    fn a_file_without_local_inputs_comes_back_as_written() {
        let text = "# comment keeps its line\ntype: sweep\ninputs:\n  d: {path: azureml:iris:1}\n";
        let (out, found) = in_yaml(text, Path::new(".")).unwrap();
        assert_eq!(out, text);
        assert!(found.is_empty());
    }

    #[test]
    fn a_missing_or_mistyped_path_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.txt"), "x").unwrap();
        let missing = "jobs:\n  s:\n    inputs:\n      d: {path: ./nope}\n";
        let e = in_yaml(missing, dir.path()).unwrap_err().to_string();
        assert!(e.starts_with("jobs.s.inputs.d.path: "), "{e}");
        let folder_wanted = "inputs:\n  d: {type: uri_folder, path: f.txt}\n";
        let e = format!("{:#}", in_yaml(folder_wanted, dir.path()).unwrap_err());
        assert!(e.contains("use type: uri_file"), "{e}");
    }
}
