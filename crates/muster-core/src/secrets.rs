//! # secrets: values a run may read, that nobody else may (DESIGN.md section 14, invariant 9)
//!
//! A secret is a named value of one workspace (`muster secret set NAME`). This module holds
//! the pure parts: the name rule, the sealed (encrypted) form the replicated state keeps,
//! the AEAD that seals and opens it, the state's table of secrets, and the [`Redactor`] an
//! agent passes a run's log through.
//!
//! **Key management and threat model.** Every server of a cluster holds one 256-bit
//! *secret key* in its data directory (`DATA_DIR/secret.key`, mode 0600), made from the OS's
//! random source by the server that founds the cluster; every other server fetches it once
//! from a peer over the authenticated server-to-server path (`ClusterService.SecretKey`,
//! servers only; encrypted with TLS) and keeps it in its own data directory. The Raft
//! log, the state snapshots and backups hold only [`Sealed`] values: ciphertext, a random
//! 96-bit nonce per value and the key's id, never the key. So a copy of a server's Raft
//! store, a snapshot, a backup or a GetRun reply gives away no secret value; a thief needs
//! the key file too (someone with root on a server has both: the key never protects a value
//! from the server itself, which decrypts it to hand it to the node that runs the attempt).
//! Values travel to agents in the attempt's assignment only, over the same authenticated
//! (and, with TLS, encrypted) session as the rest of it.
//!
//! **AEAD.** ChaCha20-Poly1305 (RFC 8439) from `ring::aead`: ring is already in the build
//! (rustls, rcgen), is well kept, and its AEAD is constant-time. The associated data is
//! `muster-secret.v1\0WORKSPACE\0NAME`, so a sealed value copied to another name or
//! workspace does not open, and tampering with any byte of the ciphertext is detected.
//! Core draws no randomness: the proposer passes the nonce in.

use std::collections::BTreeMap;
use std::fmt;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::Millis;

/// Bytes in a secret key.
pub const KEY_LEN: usize = 32;

/// Bytes in a nonce.
pub const NONCE_LEN: usize = 12;

/// The most bytes a secret's value may hold (64 KiB: keys, tokens, small certificates).
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// The most secrets one workspace may hold.
pub const MAX_SECRETS_PER_WORKSPACE: usize = 1_000;

/// What a log shows instead of a secret's value.
pub const REDACTED: &[u8] = b"***";

/// The reference a job's environment variable uses: `${{secrets.NAME}}`.
pub const REFERENCE_PREFIX: &str = "${{secrets.";

/// A cluster's secret key. Its `Debug` shows only its id.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    /// A key from its bytes (the server reads them from its data directory).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> SecretKey {
        SecretKey(bytes)
    }

    /// The key's bytes (to write the key file).
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A short public id of the key (16 hex digits of a SHA-256 of it), recorded beside each
    /// sealed value so a server with another key says so instead of "tampered".
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"muster-secret-key-id.v1\0");
        h.update(self.0);
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &self.0).expect("32-byte key"))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.id())
    }
}

/// A secret's value as the replicated state keeps it: encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The id of the key that sealed it ([`SecretKey::id`]).
    pub key_id: String,
    /// The nonce, hex (12 bytes, random per value).
    pub nonce: String,
    /// The ciphertext and its 16-byte tag, hex.
    pub ciphertext: String,
}

/// A stored secret: its name, who set it and when, and the sealed value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    /// Its workspace.
    pub workspace: String,
    /// Its name.
    pub name: String,
    /// The value, encrypted.
    pub sealed: Sealed,
    /// Who set it last (a principal label).
    pub set_by: String,
    /// When it was set last.
    pub set_at: Millis,
    /// How many times it was set (1 for a new secret).
    pub version: u64,
}

/// A run's use of a secret (a RunSpec field: names only, never values).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SecretRef {
    /// The secret's name, in the run's workspace.
    pub name: String,
    /// The environment variable that gets the value, if the job asks for one (the file
    /// `/run/secrets/NAME`, or `$MUSTER_SECRETS_DIR/NAME` for a process, is always there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

/// Why a secret was refused, or could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum SecretError {
    /// The name breaks the rule.
    #[error(
        "invalid secret name {0:?}: use 1 to 64 letters, digits and '_', starting with a letter or '_'"
    )]
    InvalidName(String),
    /// No such secret in the workspace.
    #[error(
        "secret {name:?} does not exist in workspace {workspace}: set it with `muster secret set {name} --workspace {workspace}`"
    )]
    Unknown {
        /// The workspace.
        workspace: String,
        /// The name.
        name: String,
    },
    /// An empty value.
    #[error("secret {0:?}: the value is empty")]
    Empty(String),
    /// Too big a value.
    #[error("secret {name:?}: the value has {bytes} bytes, over the limit of {MAX_SECRET_BYTES}")]
    TooLarge {
        /// The name.
        name: String,
        /// Its size.
        bytes: usize,
    },
    /// The workspace is full.
    #[error(
        "workspace {0} holds {MAX_SECRETS_PER_WORKSPACE} secrets, the most it may: delete some (`muster secret delete NAME`)"
    )]
    TooMany(String),
    /// The sealed value was made with another key.
    #[error(
        "secret {name:?} was sealed with key {sealed_with}, this server has key {have}: give every server the same secret.key"
    )]
    WrongKey {
        /// The name.
        name: String,
        /// The key id it was sealed with.
        sealed_with: String,
        /// This server's key id.
        have: String,
    },
    /// The ciphertext, nonce or associated data does not verify.
    #[error("secret {0:?} does not decrypt: its stored form was altered")]
    Tampered(String),
}

/// Checks a secret's name: 1 to 64 of `[A-Za-z0-9_]`, not starting with a digit (so it is a
/// valid file name and environment variable name).
pub fn validate_name(name: &str) -> Result<(), SecretError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(SecretError::InvalidName(name.to_string()))
    }
}

fn aad(workspace: &str, name: &str) -> Vec<u8> {
    let mut out = b"muster-secret.v1\0".to_vec();
    out.extend_from_slice(workspace.as_bytes());
    out.push(0);
    out.extend_from_slice(name.as_bytes());
    out
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Seals `value` as secret `name` of `workspace` under `key`, with `nonce` (random, drawn by
/// the caller, never reused with the same key).
pub fn seal(
    key: &SecretKey,
    nonce: [u8; NONCE_LEN],
    workspace: &str,
    name: &str,
    value: &[u8],
) -> Sealed {
    let mut buf = value.to_vec();
    key.aead()
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(workspace, name)),
            &mut buf,
        )
        .expect("a value under 64 KiB seals");
    Sealed {
        key_id: key.id(),
        nonce: to_hex(&nonce),
        ciphertext: to_hex(&buf),
    }
}

/// Opens a sealed value of secret `name` of `workspace`: the plaintext, or why not.
pub fn open(
    key: &SecretKey,
    sealed: &Sealed,
    workspace: &str,
    name: &str,
) -> Result<Vec<u8>, SecretError> {
    if sealed.key_id != key.id() {
        return Err(SecretError::WrongKey {
            name: name.to_string(),
            sealed_with: sealed.key_id.clone(),
            have: key.id(),
        });
    }
    let tampered = || SecretError::Tampered(name.to_string());
    let nonce: [u8; NONCE_LEN] = from_hex(&sealed.nonce)
        .and_then(|n| n.try_into().ok())
        .ok_or_else(tampered)?;
    let mut buf = from_hex(&sealed.ciphertext).ok_or_else(tampered)?;
    let plain = key
        .aead()
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(workspace, name)),
            &mut buf,
        )
        .map_err(|_| tampered())?;
    Ok(plain.to_vec())
}

/// The replicated table of secrets, by `WORKSPACE/NAME`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secrets {
    /// Every secret, by `WORKSPACE/NAME`.
    #[serde(default)]
    pub by_key: BTreeMap<String, Secret>,
}

fn table_key(workspace: &str, name: &str) -> String {
    format!("{workspace}/{name}")
}

impl Secrets {
    /// Nothing stored (left out of snapshots).
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Secret `name` of `workspace`.
    pub fn get(&self, workspace: &str, name: &str) -> Option<&Secret> {
        self.by_key.get(&table_key(workspace, name))
    }

    /// The secrets of `workspace`, by name.
    pub fn of_workspace<'a>(&'a self, workspace: &'a str) -> impl Iterator<Item = &'a Secret> {
        self.by_key
            .values()
            .filter(move |s| s.workspace == workspace)
    }

    /// Checks every reference names a secret of `workspace`; the first unknown one is the
    /// error (it says how to set it).
    pub fn check_refs(&self, workspace: &str, refs: &[SecretRef]) -> Result<(), SecretError> {
        for r in refs {
            if self.get(workspace, &r.name).is_none() {
                return Err(SecretError::Unknown {
                    workspace: workspace.to_string(),
                    name: r.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Stores (or replaces) a sealed value. Returns the audit detail.
    pub fn set(
        &mut self,
        workspace: &str,
        name: &str,
        sealed: &Sealed,
        by: &str,
        at: Millis,
    ) -> Result<String, SecretError> {
        validate_name(name)?;
        let key = table_key(workspace, name);
        let version = match self.by_key.get(&key) {
            Some(old) => old.version + 1,
            None => {
                if self.of_workspace(workspace).count() >= MAX_SECRETS_PER_WORKSPACE {
                    return Err(SecretError::TooMany(workspace.to_string()));
                }
                1
            }
        };
        self.by_key.insert(
            key,
            Secret {
                workspace: workspace.to_string(),
                name: name.to_string(),
                sealed: sealed.clone(),
                set_by: by.to_string(),
                set_at: at,
                version,
            },
        );
        Ok(format!(
            "secret {name} in workspace {workspace} (version {version})"
        ))
    }

    /// Removes a secret. Returns the audit detail.
    pub fn delete(&mut self, workspace: &str, name: &str) -> Result<String, SecretError> {
        self.by_key
            .remove(&table_key(workspace, name))
            .map(|_| format!("secret {name} in workspace {workspace}"))
            .ok_or_else(|| SecretError::Unknown {
                workspace: workspace.to_string(),
                name: name.to_string(),
            })
    }

    /// Removes every secret of a workspace (it is being deleted).
    pub fn drop_workspace(&mut self, workspace: &str) {
        self.by_key.retain(|_, s| s.workspace != workspace);
    }
}

/// Replaces secret values in a stream of log bytes with [`REDACTED`], also when a value is
/// split across two writes: a tail that could be the start of a value is held back until
/// the next write says whether it is (or [`Redactor::finish`] ends the stream).
#[derive(Clone, Default)]
pub struct Redactor {
    /// The values, longest first (a longer value wins where two start at the same byte).
    values: Vec<Vec<u8>>,
    /// Bytes held back: a prefix of some value, at the end of the last write.
    held: Vec<u8>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} values)", self.values.len())
    }
}

impl Redactor {
    /// A redactor for these values. Each is also redacted without its trailing newline
    /// (a file read with `cat` and a value echoed differ only there); empty ones are ignored.
    pub fn new<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Redactor {
        let mut all: Vec<Vec<u8>> = Vec::new();
        for v in values {
            let trimmed = v.trim_ascii_end();
            for candidate in [v, trimmed] {
                if !candidate.is_empty() && !all.iter().any(|x| x == candidate) {
                    all.push(candidate.to_vec());
                }
            }
        }
        all.sort_by_key(|v| std::cmp::Reverse(v.len()));
        Redactor {
            values: all,
            held: Vec::new(),
        }
    }

    /// Whether there is nothing to redact.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Takes the next write; returns what may be written out now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.values.is_empty() {
            return chunk.to_vec();
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while i < buf.len() {
            let rest = &buf[i..];
            if let Some(v) = self.values.iter().find(|v| rest.starts_with(v)) {
                out.extend_from_slice(REDACTED);
                i += v.len();
                continue;
            }
            if self
                .values
                .iter()
                .any(|v| v.len() > rest.len() && v.starts_with(rest))
            {
                self.held = rest.to_vec();
                return out;
            }
            out.push(buf[i]);
            i += 1;
        }
        out
    }

    /// Ends the stream: what was held back (it was not a value after all).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    /// Redacts one whole text (an error message), holding nothing back.
    pub fn redact_all(&self, text: &[u8]) -> Vec<u8> {
        let mut r = Redactor {
            values: self.values.clone(),
            held: Vec::new(),
        };
        let mut out = r.push(text);
        out.extend(r.finish());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes([b; KEY_LEN])
    }

    #[test]
    fn sealed_values_open_to_the_same_bytes_and_hide_them() {
        let k = key(7);
        let sealed = seal(&k, [1; NONCE_LEN], "vision", "DB_PASS", b"canary-123");
        assert!(!sealed.ciphertext.contains(&to_hex(b"canary-123")));
        assert_eq!(sealed.key_id, k.id());
        assert_eq!(
            open(&k, &sealed, "vision", "DB_PASS").unwrap(),
            b"canary-123"
        );
        let json = serde_json::to_string(&sealed).unwrap();
        assert!(!json.contains("canary"), "{json}");
        // Another nonce, another ciphertext.
        let other = seal(&k, [2; NONCE_LEN], "vision", "DB_PASS", b"canary-123");
        assert_ne!(other.ciphertext, sealed.ciphertext);
    }

    #[test]
    fn tampering_another_name_or_another_key_is_detected() {
        let k = key(7);
        let sealed = seal(&k, [1; NONCE_LEN], "vision", "DB_PASS", b"canary-123");
        let mut flipped = sealed.clone();
        let first = u8::from_str_radix(&flipped.ciphertext[..2], 16).unwrap() ^ 1;
        flipped
            .ciphertext
            .replace_range(..2, &format!("{first:02x}"));
        assert_eq!(
            open(&k, &flipped, "vision", "DB_PASS"),
            Err(SecretError::Tampered("DB_PASS".into()))
        );
        let mut renonced = sealed.clone();
        renonced.nonce = to_hex(&[9; NONCE_LEN]);
        assert!(matches!(
            open(&k, &renonced, "vision", "DB_PASS"),
            Err(SecretError::Tampered(_))
        ));
        // Copied to another name or workspace: the associated data differs.
        assert!(matches!(
            open(&k, &sealed, "vision", "OTHER"),
            Err(SecretError::Tampered(_))
        ));
        assert!(matches!(
            open(&k, &sealed, "nlp", "DB_PASS"),
            Err(SecretError::Tampered(_))
        ));
        let err = open(&key(8), &sealed, "vision", "DB_PASS").unwrap_err();
        assert!(matches!(err, SecretError::WrongKey { .. }), "{err}");
        let mut junk = sealed;
        junk.ciphertext = "zz".into();
        assert!(matches!(
            open(&k, &junk, "vision", "DB_PASS"),
            Err(SecretError::Tampered(_))
        ));
    }

    #[test]
    fn a_key_debugs_as_its_id_only() {
        let k = key(0xab);
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("ab, ab") && !dbg.contains("abab"), "{dbg}");
        assert_eq!(dbg, format!("SecretKey({})", k.id()));
    }

    #[test]
    fn names_are_file_and_variable_names() {
        for good in ["DB_PASS", "_x", "a1", &"A".repeat(64)] {
            validate_name(good).unwrap();
        }
        for bad in ["", "1A", "a-b", "a/b", "..", "a b", &"A".repeat(65)] {
            assert_eq!(
                validate_name(bad),
                Err(SecretError::InvalidName(bad.to_string()))
            );
        }
    }

    #[test]
    fn the_table_versions_lists_and_deletes_per_workspace() {
        let k = key(1);
        let mut t = Secrets::default();
        let s = seal(&k, [0; NONCE_LEN], "a", "X", b"v");
        t.set("a", "X", &s, "user:alice", 10).unwrap();
        t.set("a", "X", &s, "user:bob", 20).unwrap();
        t.set("b", "X", &s, "user:bob", 20).unwrap();
        let x = t.get("a", "X").unwrap();
        assert_eq!(
            (x.version, x.set_by.as_str(), x.set_at),
            (2, "user:bob", 20)
        );
        assert_eq!(t.of_workspace("a").count(), 1);
        let refs = [SecretRef {
            name: "Y".into(),
            env: None,
        }];
        let err = t.check_refs("a", &refs).unwrap_err();
        assert!(err.to_string().contains("muster secret set Y"), "{err}");
        t.delete("a", "X").unwrap();
        assert!(t.get("a", "X").is_none() && t.get("b", "X").is_some());
        assert!(matches!(
            t.delete("a", "X"),
            Err(SecretError::Unknown { .. })
        ));
        assert!(matches!(
            t.set("a", "bad-name", &s, "u", 1),
            Err(SecretError::InvalidName(_))
        ));
        t.drop_workspace("b");
        assert!(t.is_empty());
    }

    #[test]
    fn the_state_keeps_sealed_values_audits_names_and_refuses_unknown_refs() {
        use crate::state::{ApplyError, Command, State};
        let k = key(3);
        let mut state = State::default();
        let sealed = seal(&k, [5; NONCE_LEN], "default", "TOKEN", b"canary-xyz");
        let set = Command::SetSecret {
            workspace: "default".into(),
            name: "TOKEN".into(),
            sealed: sealed.clone(),
            by: "user:alice".into(),
            at: 7,
        };
        state.apply(&set).unwrap();
        // The log entry and the snapshot hold no plaintext.
        let log = String::from_utf8(set.encode()).unwrap();
        assert!(!log.contains("canary"), "{log}");
        let snapshot = serde_json::to_string(&state).unwrap();
        assert!(!snapshot.contains("canary") && snapshot.contains("TOKEN"));
        let event = state.access.audit.last().unwrap();
        assert_eq!(
            (event.actor.as_str(), event.action.as_str()),
            ("user:alice", "secret.set")
        );
        assert!(event.detail.contains("TOKEN") && !event.detail.contains("canary"));
        // A run may name it; one naming another is refused, saying what to do.
        let submit = |name: &str, id: &str| Command::SubmitRun {
            run_id: id.into(),
            spec: Box::new({
                let mut s = crate::spec::RunSpec::new("echo");
                s.secrets = vec![SecretRef {
                    name: name.into(),
                    env: None,
                }];
                s
            }),
            idempotency_key: None,
            at: 8,
        };
        // (No compute target exists here: a known secret gets past the secret check.)
        let known = state.apply(&submit("TOKEN", "run-1")).unwrap_err();
        assert!(!matches!(known, ApplyError::Secret(_)), "{known}");
        let err = state.apply(&submit("NOPE", "run-2")).unwrap_err();
        assert!(matches!(
            err,
            ApplyError::Secret(SecretError::Unknown { .. })
        ));
        assert!(err.to_string().contains("muster secret set NOPE"), "{err}");
        // Another workspace does not exist yet: refused.
        let other = Command::SetSecret {
            workspace: "nlp".into(),
            name: "TOKEN".into(),
            sealed,
            by: "user:alice".into(),
            at: 9,
        };
        assert!(state.apply(&other).is_err());
        state
            .apply(&Command::DeleteSecret {
                workspace: "default".into(),
                name: "TOKEN".into(),
                by: "user:bob".into(),
                at: 10,
            })
            .unwrap();
        assert!(state.secrets.is_empty());
        assert_eq!(state.access.audit.last().unwrap().action, "secret.delete");
        state.sanity_check().unwrap();
    }

    fn run(r: &mut Redactor, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(r.push(c));
        }
        out.extend(r.finish());
        out
    }

    #[test]
    fn redaction_replaces_values_in_one_write() {
        let mut r = Redactor::new([b"hunter2".as_slice()]);
        assert_eq!(
            run(&mut r, &[b"pw=hunter2 and hunter2\n"]),
            b"pw=*** and ***\n"
        );
    }

    #[test]
    fn redaction_handles_a_value_split_across_writes() {
        let value = b"canary-5f2e".as_slice();
        let text = b"env: canary-5f2e; file: canary-5f2e\n".as_slice();
        for split in 0..=text.len() {
            let mut r = Redactor::new([value]);
            let out = run(&mut r, &[&text[..split], &text[split..]]);
            assert_eq!(out, b"env: ***; file: ***\n", "split at {split}");
        }
        // One byte at a time.
        let mut r = Redactor::new([value]);
        let chunks: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(run(&mut r, &chunks), b"env: ***; file: ***\n");
    }

    #[test]
    fn a_held_back_prefix_that_is_no_value_comes_out_unchanged() {
        let mut r = Redactor::new([b"secret".as_slice()]);
        assert_eq!(r.push(b"a secr"), b"a ");
        assert_eq!(r.push(b"et!"), b"***!");
        assert_eq!(r.push(b" secr"), b" ");
        assert_eq!(r.finish(), b"secr");
        assert_eq!(r.push(b"sec"), b"");
        assert_eq!(r.push(b"ond"), b"second");
    }

    #[test]
    fn redaction_takes_the_longest_value_and_a_value_without_its_newline() {
        let mut r = Redactor::new([b"abc".as_slice(), b"abcdef\n".as_slice()]);
        assert_eq!(run(&mut r, &[b"abcdef abc abcdef\n"]), b"*** *** ***");
        let r = Redactor::new([b"tok\n".as_slice()]);
        assert_eq!(r.redact_all(b"error: tok is bad"), b"error: *** is bad");
        let mut none = Redactor::new([b"".as_slice()]);
        assert!(none.is_empty());
        assert_eq!(run(&mut none, &[b"as is"]), b"as is");
    }
}
