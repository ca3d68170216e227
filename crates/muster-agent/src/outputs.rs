//! Packs an attempt's `outputs/` directory into a tar archive and uploads it as a blob.

use std::path::{Path, PathBuf};

use muster_client::Blobs;
use muster_client::Channel;
use muster_proto::v1::blob_service_client::BlobServiceClient;

/// Archives `outputs` (if it has any file or folder: a pipeline step's declared outputs are
/// folders, empty or not) to `archive` and uploads it; returns its address.
pub(crate) async fn upload(
    client: &mut BlobServiceClient<Channel>,
    outputs: &Path,
    archive: PathBuf,
) -> anyhow::Result<Option<String>> {
    let dir = outputs.to_path_buf();
    let tar_path = archive.clone();
    let has_files = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
        let any = has_entry(&dir);
        if !any {
            return Ok(false);
        }
        let file = std::fs::File::create(&tar_path)?;
        let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
        builder.follow_symlinks(false);
        builder.append_dir_all(".", &dir)?;
        builder
            .into_inner()?
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
        Ok(true)
    })
    .await??;
    if !has_files {
        return Ok(None);
    }
    let sha = muster_client::hash_file(&archive)?;
    let mut client = Blobs::new(client.clone());
    if !client.missing(vec![sha.clone()]).await?.is_empty() {
        client.upload_file(&sha, &archive).await?;
    }
    let _ = tokio::fs::remove_file(&archive).await;
    Ok(Some(sha))
}

fn has_entry(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut e| e.next().is_some())
}
