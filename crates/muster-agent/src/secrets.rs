//! Secret delivery: the values of the secrets a run names, as its assignment carries them
//! (the server opens them for this attempt only; `muster_core::secrets` has the design).
//!
//! - **Files.** Each value is a 0400 file `NAME` in a private 0700 directory on tmpfs
//!   (`/dev/shm/muster-secrets/RUN-ATTEMPT-RANK`, so a value never touches the node's
//!   disk; where `/dev/shm` is missing, `.secrets/` in the attempt's private directory). A
//!   process finds it at `$MUSTER_SECRETS_DIR`; a container gets it read-only at
//!   `/run/secrets`. [`SecretFiles`] removes the directory when the attempt ends (dropped).
//! - **Variables.** A secret the job gives a variable (`NAME: {env: VAR}`, or
//!   `VAR: ${{secrets.NAME}}`) is also that environment variable.
//! - **Redaction.** Every value is replaced with `***` in the log as it is written (the
//!   process executor passes its output through [`RunSecrets::redactor`]).
//!
//! Nothing here prints a value: [`RunSecrets`]'s `Debug` names the secrets only.

use std::fmt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use muster_core::secrets::Redactor;
use muster_core::spec::RunSpec;
use muster_proto::v1;

/// Where a container sees its secrets.
pub(crate) const CONTAINER_DIR: &str = "/run/secrets";

/// The tmpfs under which secret directories go, when the node has it.
const TMPFS_ROOT: &str = "/dev/shm";

/// The folder of the attempts' secret folders on that tmpfs (a container may mount one
/// attempt's folder below it, though `/dev` is otherwise never mounted).
pub(crate) const SECRETS_ROOT: &str = "/dev/shm/muster-secrets";

/// One attempt's secret values, by name.
#[derive(Clone, Default)]
pub(crate) struct RunSecrets {
    values: Vec<v1::SecretValue>,
}

impl fmt::Debug for RunSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.values.iter().map(|v| v.name.as_str()).collect();
        write!(f, "RunSecrets({names:?})")
    }
}

impl RunSecrets {
    /// The values the assignment carries for the secrets `spec` names; every one must be
    /// there (a secret deleted since the submission, or a server without the key, is an
    /// error naming it).
    pub(crate) fn from_assignment(
        spec: &RunSpec,
        delivered: &[v1::SecretValue],
    ) -> Result<RunSecrets, String> {
        for r in &spec.secrets {
            if !delivered.iter().any(|v| v.name == r.name) {
                return Err(format!(
                    "secret {:?} of workspace {} was not delivered with the attempt: it was deleted since the run was submitted, or the leader has no secret key (set it again with `muster secret set {}`)",
                    r.name, spec.workspace, r.name
                ));
            }
        }
        Ok(RunSecrets {
            values: delivered.to_vec(),
        })
    }

    /// Whether the run has no secrets.
    pub(crate) fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The environment variables the job asked for (values as UTF-8, lossily).
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        self.values
            .iter()
            .filter_map(|v| {
                v.env
                    .clone()
                    .map(|e| (e, String::from_utf8_lossy(&v.value).into_owned()))
            })
            .collect()
    }

    /// What redacts every value from the log.
    pub(crate) fn redactor(&self) -> Redactor {
        Redactor::new(self.values.iter().map(|v| v.value.as_slice()))
    }

    /// Writes each value to a 0400 file in a fresh 0700 directory for attempt `tag`
    /// (`RUN-ATTEMPT-RANK`): on tmpfs where the node has `/dev/shm`, else under `fallback`.
    pub(crate) fn write(&self, tag: &str, fallback: &Path) -> std::io::Result<SecretFiles> {
        let tmpfs = Path::new(TMPFS_ROOT);
        let root = if tmpfs.is_dir() {
            PathBuf::from(SECRETS_ROOT)
        } else {
            fallback.join(".secrets")
        };
        self.write_under(&root, tag)
    }

    fn write_under(&self, root: &Path, tag: &str) -> std::io::Result<SecretFiles> {
        // Others may pass through the root (to the one directory given to them) but not
        // list it.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(root)?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
        let dir = root.join(tag);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        // From here the guard removes the directory, also on an error below.
        let files = SecretFiles { dir };
        for v in &self.values {
            use std::io::Write;
            let path = files.dir.join(&v.name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&path)?;
            f.write_all(&v.value)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o400))?;
        }
        Ok(files)
    }
}

/// An attempt's secret directory; removed when dropped (the attempt ended).
#[derive(Debug)]
pub(crate) struct SecretFiles {
    dir: PathBuf,
}

impl SecretFiles {
    /// The directory holding the files.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SecretFiles {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), cause = %e, "cannot remove a secret directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_core::secrets::SecretRef;

    fn value(name: &str, env: Option<&str>, v: &[u8]) -> v1::SecretValue {
        v1::SecretValue {
            name: name.into(),
            env: env.map(str::to_string),
            value: v.to_vec(),
        }
    }

    #[test]
    fn files_are_0400_in_a_0700_dir_removed_at_the_end() {
        let root = tempfile::tempdir().unwrap();
        let s = RunSecrets {
            values: vec![
                value("A", None, b"canary-a"),
                value("B", Some("VAR_B"), b"canary-b"),
            ],
        };
        let files = s.write_under(root.path(), "run-1-0").unwrap();
        let dir = files.dir().to_path_buf();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("A")), 0o400);
        assert_eq!(std::fs::read(dir.join("B")).unwrap(), b"canary-b");
        assert_eq!(s.env(), vec![("VAR_B".to_string(), "canary-b".to_string())]);
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("canary"), "{dbg}");
        assert_eq!(s.redactor().redact_all(b"x canary-a y"), b"x *** y");
        drop(files);
        assert!(!dir.exists());
    }

    #[test]
    fn a_secret_the_assignment_lacks_fails_the_attempt_naming_it() {
        let mut spec = RunSpec::new("echo");
        spec.secrets = vec![SecretRef {
            name: "GONE".into(),
            env: None,
        }];
        let err = RunSecrets::from_assignment(&spec, &[]).unwrap_err();
        assert!(
            err.contains("\"GONE\"") && err.contains("muster secret set GONE"),
            "{err}"
        );
        let ok = RunSecrets::from_assignment(&spec, &[value("GONE", None, b"v")]).unwrap();
        assert!(!ok.is_empty());
    }
}
