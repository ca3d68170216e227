//! Materializes a code snapshot into an attempt's working directory, through a local
//! content-addressed cache so an unchanged file is downloaded once per node.

use std::path::Path;

use muster_client::Blobs;
use muster_client::Channel;
use muster_core::snapshot::Manifest;
use muster_proto::v1::blob_service_client::BlobServiceClient;

/// How [`materialize`] places each file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// A copy of its own, with the manifest's mode (0644, or 0755 when executable).
    Copy,
    /// A hard link to the cached blob, made read-only (0444, or 0555 when executable):
    /// no copy at all, for a container whose workspace is mounted read-only. A copy
    /// where the cache is on another file system.
    Link,
}

/// Fetches manifest `manifest_sha` and its files into `dest`, using `cache` for blobs.
pub(crate) async fn materialize(
    client: &mut BlobServiceClient<Channel>,
    manifest_sha: &str,
    cache: &Path,
    dest: &Path,
    place: Place,
) -> anyhow::Result<usize> {
    let mut client = Blobs::new(client.clone());
    // Content-addressed: a manifest this node fetched before (every run of an unchanged
    // directory) is read from the cache instead of asked of a server again.
    let cached_manifest = cache
        .join(&manifest_sha[..2.min(manifest_sha.len())])
        .join(manifest_sha);
    if !cached_manifest.exists() {
        client.download(manifest_sha, &cached_manifest).await?;
    }
    let bytes = tokio::fs::read(&cached_manifest).await?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("the snapshot manifest {manifest_sha} is not valid: {e}"))?;
    manifest.validate().map_err(|e| anyhow::anyhow!(e))?;
    for file in &manifest.files {
        let cached = cache.join(&file.sha256[..2]).join(&file.sha256);
        if !cached.exists() {
            client.download(&file.sha256, &cached).await?;
        }
        let target = dest.join(&file.path);
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        // A retried preparation finds its earlier link or copy: replace it, never write
        // through a link into the cache.
        let _ = tokio::fs::remove_file(&target).await;
        let linked = place == Place::Link && tokio::fs::hard_link(&cached, &target).await.is_ok();
        if !linked {
            tokio::fs::copy(&cached, &target).await?;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = match (linked, file.executable) {
                (false, false) => 0o644,
                (false, true) => 0o755,
                (true, false) => 0o444,
                (true, true) => 0o555,
            };
            tokio::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).await?;
        }
    }
    Ok(manifest.files.len())
}
