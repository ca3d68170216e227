//! Data assets, as Azure ML's `az ml data create` makes them: a named, versioned
//! `uri_file` or `uri_folder` of a workspace, stored in muster's blob store (a snapshot
//! uploaded when it was made) or at an http(s) URL. A job input `azureml:NAME:VERSION`,
//! `azureml:NAME@latest` or `azureml:NAME` names one; `muster run submit` resolves it to
//! what the agent places at `inputs/<input>/`.
//!
//! Versions are immutable: making an existing NAME:VERSION again is refused.
//!
//! A **datastore** is Azure ML's name for storage; on a farm it is a folder every node of
//! the workspace sees at the same path (an NFS or Lustre mount an operator set up). A job
//! input `azureml://datastores/NAME/paths/REL` is that folder's `REL`, placed read-only at
//! `inputs/<input>` (a bind mount in a container, a link for a process).

use serde::{Deserialize, Serialize};

use crate::Millis;
use crate::spec::{MAX_INPUT_URL_BYTES, OutputKind, SpecError};

/// Where an asset's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DataSource {
    /// A snapshot in the blob store; for a `uri_file`, the one file in it.
    Snapshot {
        /// SHA-256 of the manifest.
        manifest: String,
        /// The file's name, for a `uri_file`.
        file: Option<String>,
    },
    /// An http(s) URL of one file.
    Url {
        /// The URL.
        url: String,
    },
    /// A folder of a run's outputs archive (an output registered with `name:`).
    Output {
        /// SHA-256 of the outputs archive.
        archive: String,
        /// The output's folder in it.
        folder: String,
    },
}

/// How a job input names a registered output: `muster-output://ARCHIVE/FOLDER`.
pub const OUTPUT_SCHEME: &str = "muster-output://";

/// One version of a data asset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataAsset {
    /// Its name (letters, digits, `-`, `_`, `.`; 1–255).
    pub name: String,
    /// Its version (letters, digits, `-`, `_`, `.`; 1–30).
    pub version: String,
    /// The workspace it belongs to.
    pub workspace: String,
    /// `uri_file` or `uri_folder`.
    pub kind: OutputKind,
    /// Where its bytes are.
    pub source: DataSource,
    /// Free text.
    pub description: Option<String>,
    /// When it was made.
    pub created_at: Millis,
    /// Who made it.
    pub created_by: String,
}

/// How the state keys what a workspace names: `WORKSPACE/NAME` (data assets, datastores,
/// components).
pub fn scoped(workspace: &str, name: &str) -> String {
    format!("{workspace}/{name}")
}

/// A datastore: a folder the nodes share, by name, in one workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datastore {
    /// Its name (as an input name).
    pub name: String,
    /// The workspace it belongs to.
    pub workspace: String,
    /// The absolute path every node sees.
    pub path: String,
    /// When it was made.
    pub created_at: Millis,
    /// Who made it.
    pub created_by: String,
}

impl Datastore {
    /// Checks the name and that the path is absolute, normal and not the root.
    pub fn validate(&self) -> Result<(), SpecError> {
        crate::names::validate_input_name(&self.name)
            .map_err(|e| SpecError::field("name", e.to_string().replace("input", "datastore")))?;
        let p = &self.path;
        let normal = p.starts_with('/')
            && p.len() > 1
            && p.len() <= 4096
            && !p.ends_with('/')
            && p[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
            && !p.chars().any(|c| c.is_control());
        if !normal {
            return Err(SpecError::field(
                "path",
                format!("{p:?}: give the absolute path (not /) of the folder the nodes share"),
            ));
        }
        Ok(())
    }
}

/// `azureml://datastores/NAME/paths/REL` split into the datastore and the relative path
/// (`None` when it is not a datastore URI; an error when REL would leave the datastore).
pub fn parse_datastore_uri(uri: &str) -> Option<Result<(&str, &str), String>> {
    let rest = uri.strip_prefix("azureml://datastores/")?;
    Some(match rest.split_once("/paths/") {
        Some((name, rel))
            if !name.is_empty()
                && rel
                    .trim_end_matches('/')
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != "..") =>
        {
            Ok((name, rel.trim_end_matches('/')))
        }
        _ => Err(format!(
            "{uri:?}: use azureml://datastores/NAME/paths/PATH, PATH inside the datastore"
        )),
    })
}

/// `NAME:VERSION`, `NAME@latest` or `NAME` (latest) as a job input names an asset, with
/// the `azureml:` prefix removed: the name and the version (`None`: the latest).
/// `NAME@VERSION`, the early CLI v2 samples' form (`azureml:iris@1`), names that version.
pub fn parse_reference(reference: &str) -> Result<(&str, Option<&str>), String> {
    let (name, version) = if let Some((n, v)) = reference.split_once(':') {
        (n, Some(v))
    } else if let Some((n, v)) = reference.split_once('@') {
        (n, (v != "latest").then_some(v))
    } else {
        (reference, None)
    };
    crate::names::validate_input_name(name).map_err(|e| e.to_string())?;
    Ok((name, version))
}

/// A version of an asset or a component: 1–30 letters, digits, `-`, `_` or `.`.
fn validate_version(version: &str) -> Result<(), SpecError> {
    let ok = !version.is_empty()
        && version.len() <= 30
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::field(
            "version",
            format!("{version:?}: use 1 to 30 letters, digits, '-', '_' or '.'"),
        ))
    }
}

impl DataAsset {
    /// Checks the name, the version and the source; the error names the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        crate::names::validate_input_name(&self.name)
            .map_err(|e| SpecError::field("name", e.to_string().replace("input", "data asset")))?;
        validate_version(&self.version)?;
        match (&self.source, self.kind) {
            (DataSource::Snapshot { manifest, .. }, _)
                if !crate::snapshot::is_sha256_hex(manifest) =>
            {
                Err(SpecError::field(
                    "path",
                    "the manifest is not a SHA-256 digest",
                ))
            }
            (DataSource::Snapshot { file: None, .. }, OutputKind::UriFile) => Err(
                SpecError::field("path", "a uri_file asset names its one file"),
            ),
            (DataSource::Output { archive, folder }, kind) => {
                if !crate::snapshot::is_sha256_hex(archive)
                    || crate::names::validate_output_name(folder).is_err()
                    || kind != OutputKind::UriFolder
                {
                    return Err(SpecError::field(
                        "path",
                        "a registered output is a folder of an outputs archive",
                    ));
                }
                Ok(())
            }
            (DataSource::Snapshot { file: Some(_), .. }, OutputKind::UriFolder) => Err(
                SpecError::field("path", "a uri_folder asset is a folder, not one file"),
            ),
            (DataSource::Url { url }, kind) => {
                if kind != OutputKind::UriFile {
                    return Err(SpecError::field(
                        "type",
                        "an http(s) URL names one file: use type: uri_file",
                    ));
                }
                if !crate::spec::is_input_url(url) {
                    return Err(SpecError::field(
                        "path",
                        format!("not an http(s) URL of at most {MAX_INPUT_URL_BYTES} bytes"),
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The job input path that stands for this asset: `muster-blob://MANIFEST[/FILE]` or
    /// its URL (what [`crate::spec::JobFile::into_run_spec`] places).
    pub fn input_path(&self) -> String {
        match &self.source {
            DataSource::Snapshot {
                manifest,
                file: Some(f),
            } => format!("{}{manifest}/{f}", crate::spec::BLOB_SCHEME),
            DataSource::Snapshot {
                manifest,
                file: None,
            } => format!("{}{manifest}", crate::spec::BLOB_SCHEME),
            DataSource::Url { url } => url.clone(),
            DataSource::Output { archive, folder } => format!("{OUTPUT_SCHEME}{archive}/{folder}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_a_version_or_the_latest() {
        assert_eq!(parse_reference("iris:1"), Ok(("iris", Some("1"))));
        assert_eq!(parse_reference("iris@latest"), Ok(("iris", None)));
        assert_eq!(parse_reference("iris"), Ok(("iris", None)));
        assert_eq!(parse_reference("iris@2"), Ok(("iris", Some("2"))));
        assert!(parse_reference("../x:1").is_err());
    }

    #[test]
    fn an_asset_is_checked_field_by_field() {
        let ok = DataAsset {
            name: "iris".into(),
            version: "1".into(),
            workspace: "default".into(),
            kind: OutputKind::UriFile,
            source: DataSource::Url {
                url: "https://example.org/iris.csv".into(),
            },
            description: None,
            created_at: 1,
            created_by: "user:ada".into(),
        };
        ok.validate().unwrap();
        assert_eq!(ok.input_path(), "https://example.org/iris.csv");
        let bad = |f: &dyn Fn(&mut DataAsset)| {
            let mut a = ok.clone();
            f(&mut a);
            a.validate().unwrap_err().path
        };
        assert_eq!(bad(&|a| a.version = "1 2".into()), "version");
        assert_eq!(bad(&|a| a.kind = OutputKind::UriFolder), "type");
        assert_eq!(
            bad(&|a| a.source = DataSource::Snapshot {
                manifest: "nope".into(),
                file: None
            }),
            "path"
        );
    }
}

/// A registered command component (`muster component create`): its YAML as written
/// (without `code`), its code snapshot, by name and immutable version, in a workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The workspace it belongs to.
    pub workspace: String,
    /// The component's YAML (a `type: command` component), `code` left out.
    pub yaml: String,
    /// Its code snapshot's manifest, if it has code.
    pub code: Option<String>,
    /// When it was made.
    pub created_at: Millis,
    /// Who made it.
    pub created_by: String,
}

impl Component {
    /// Checks the name, the version, the code digest and that the YAML is a command
    /// component a pipeline step can use (its required inputs bound by the step).
    pub fn validate(&self) -> Result<(), SpecError> {
        crate::names::validate_input_name(&self.name)
            .map_err(|e| SpecError::field("name", e.to_string().replace("input", "component")))?;
        validate_version(&self.version)?;
        if self
            .code
            .as_ref()
            .is_some_and(|c| !crate::snapshot::is_sha256_hex(c))
        {
            return Err(SpecError::field(
                "code",
                "the manifest is not a SHA-256 digest",
            ));
        }
        crate::spec::check_yaml_limits(&self.yaml)?;
        let component: yaml_serde::Value = yaml_serde::from_str(&self.yaml)
            .map_err(|e| SpecError::field("", format!("the component is not YAML: {e}")))?;
        crate::component::check_definition(component)
    }
}
