//! The cluster's secret key in this server's data directory (`DATA_DIR/secret.key`, 0600,
//! 64 hex digits): what opens the sealed secret values of the replicated state
//! (`muster_core::secrets` has the threat model). The server that founds a cluster makes it
//! from the OS's random source (`ring::rand::SystemRandom`) on first start; every other
//! server fetches it from a peer once (`ClusterService.SecretKey`, servers only, over the
//! authenticated — with TLS, encrypted — server path) and keeps it here too, or is given a
//! copy of the file by its operator. A server without one stores and delivers no secret (it
//! says so). The key never goes into the Raft log, a snapshot, a backup or a log line.

use std::io;
use std::path::{Path, PathBuf};

use muster_core::secrets::{KEY_LEN, NONCE_LEN, SecretKey};
use ring::rand::{SecureRandom, SystemRandom};

/// The key file's name in the data directory.
pub const SECRET_KEY_FILE: &str = "secret.key";

/// Where the key of the server storing in `data_dir` is.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(SECRET_KEY_FILE)
}

/// Reads the key from `data_dir`, making it first when `create` (the founding server) and
/// there is none. `Ok(None)`: no key and not ours to make.
pub fn load(data_dir: &Path, create: bool) -> io::Result<Option<SecretKey>> {
    let path = path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(text.trim()).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} does not hold a secret key (64 hex digits): restore it from the other servers' copy",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            let mut bytes = [0u8; KEY_LEN];
            SystemRandom::new()
                .fill(&mut bytes)
                .map_err(|_| io::Error::other("the OS random source failed"))?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            muster_client::write_secret_file(&path, &format!("{hex}\n"), 0o600)?;
            Ok(Some(SecretKey::from_bytes(bytes)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Keeps `key` in `data_dir` (0600), replacing what is there: the key a server without one
/// got from a peer.
pub fn save(data_dir: &Path, key: &SecretKey) -> io::Result<()> {
    let hex: String = key.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    muster_client::write_secret_file(&path(data_dir), &format!("{hex}\n"), 0o600)
}

fn parse(hex: &str) -> Option<SecretKey> {
    if hex.len() != KEY_LEN * 2 {
        return None;
    }
    let mut bytes = [0u8; KEY_LEN];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(SecretKey::from_bytes(bytes))
}

/// A fresh random nonce for one sealed value.
pub fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| io::Error::other("the OS random source failed"))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_founder_makes_a_0600_key_others_read_it_and_junk_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("muster-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir, false).unwrap(), None);
        let made = load(&dir, true).unwrap().unwrap();
        let mode = std::fs::metadata(path(&dir)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load(&dir, false).unwrap(), Some(made.clone()));
        assert_eq!(load(&dir, true).unwrap(), Some(made));
        std::fs::write(path(&dir), "not hex").unwrap();
        let err = load(&dir, true).unwrap_err();
        assert!(err.to_string().contains("secret.key"), "{err}");
        assert_ne!(nonce().unwrap(), nonce().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
