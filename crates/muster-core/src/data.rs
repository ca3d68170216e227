//! Data assets, as Azure ML's `az ml data create` makes them: a named, versioned
//! `uri_file` or `uri_folder` of a workspace, stored in muster's blob store (a snapshot
//! uploaded when it was made) or at an http(s) URL. A job input `azureml:NAME:VERSION`,
//! `azureml:NAME@latest` or `azureml:NAME` names one; `muster run submit` resolves it to
//! what the agent places at `inputs/<input>/`.
//!
//! Versions are immutable: making an existing NAME:VERSION again is refused.

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
}

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

/// `NAME:VERSION`, `NAME@latest` or `NAME` (latest) as a job input names an asset, with
/// the `azureml:` prefix removed: the name and the version (`None`: the latest).
pub fn parse_reference(reference: &str) -> Result<(&str, Option<&str>), String> {
    let (name, version) = if let Some((n, v)) = reference.split_once(':') {
        (n, Some(v))
    } else if let Some((n, v)) = reference.split_once('@') {
        if v != "latest" {
            return Err(format!(
                "{reference:?}: use NAME@latest or NAME:VERSION (as Azure ML does)"
            ));
        }
        (n, None)
    } else {
        (reference, None)
    };
    crate::names::validate_input_name(name).map_err(|e| e.to_string())?;
    Ok((name, version))
}

impl DataAsset {
    /// Checks the name, the version and the source; the error names the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        crate::names::validate_input_name(&self.name)
            .map_err(|e| SpecError::field("name", e.to_string().replace("input", "data asset")))?;
        if self.version.is_empty()
            || self.version.len() > 30
            || !self
                .version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(SpecError::field(
                "version",
                format!(
                    "{:?}: use 1 to 30 letters, digits, '-', '_' or '.'",
                    self.version
                ),
            ));
        }
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
        assert!(parse_reference("iris@2").is_err());
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
