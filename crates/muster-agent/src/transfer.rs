//! Blob transfers over BlobService: download with digest check, upload only when missing.
//! Shared with the CLI (snapshot upload, `run download`), which links this crate anyway.

use std::path::Path;

use futures::StreamExt;
use muster_proto::v1::blob_service_client::BlobServiceClient;
use muster_proto::v1::{BlobChunk, GetBlobRequest, MissingBlobsRequest};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

const CHUNK: usize = 1 << 20;

/// SHA-256 of a file, lowercase hex.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Downloads blob `sha256` into `dest` (via a temporary file; the digest is checked).
pub async fn download(
    client: &mut BlobServiceClient<Channel>,
    sha256: &str,
    dest: &Path,
) -> anyhow::Result<u64> {
    let mut stream = client
        .get_blob(GetBlobRequest {
            sha256: sha256.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("blob {sha256}: {}", s.message()))?
        .into_inner();
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let tmp = dest.with_extension(format!("part{}", rand::random::<u32>()));
    let mut file = tokio::fs::File::create(&tmp).await?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let result: anyhow::Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|s| anyhow::anyhow!("blob {sha256}: {}", s.message()))?;
            hasher.update(&chunk.data);
            size += chunk.data.len() as u64;
            file.write_all(&chunk.data).await?;
        }
        file.flush().await?;
        Ok(())
    }
    .await;
    drop(file);
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    let actual = hex::encode(hasher.finalize());
    if actual != sha256 {
        let _ = tokio::fs::remove_file(&tmp).await;
        anyhow::bail!("blob {sha256} arrived corrupted (hashes to {actual})");
    }
    tokio::fs::rename(&tmp, dest).await?;
    Ok(size)
}

/// Downloads a small blob into memory (manifests).
pub async fn download_bytes(
    client: &mut BlobServiceClient<Channel>,
    sha256: &str,
) -> anyhow::Result<Vec<u8>> {
    let mut stream = client
        .get_blob(GetBlobRequest {
            sha256: sha256.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("blob {sha256}: {}", s.message()))?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend_from_slice(
            &chunk
                .map_err(|s| anyhow::anyhow!("blob {sha256}: {}", s.message()))?
                .data,
        );
    }
    if hex::encode(Sha256::digest(&data)) != sha256 {
        anyhow::bail!("blob {sha256} arrived corrupted");
    }
    Ok(data)
}

/// The subset of `hashes` the server lacks.
pub async fn missing(
    client: &mut BlobServiceClient<Channel>,
    hashes: Vec<String>,
) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for batch in hashes.chunks(5_000) {
        let resp = client
            .missing_blobs(MissingBlobsRequest {
                sha256: batch.to_vec(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        out.extend(resp.into_inner().sha256);
    }
    Ok(out)
}

/// Uploads a file as blob `sha256` (the caller hashed it).
pub async fn upload_file(
    client: &mut BlobServiceClient<Channel>,
    sha256: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let mut file = tokio::fs::File::open(path).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let sha = sha256.to_string();
    let reader = tokio::spawn(async move {
        let mut first = true;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = file.read(&mut buf).await?;
            if n == 0 && !first {
                break;
            }
            buf.truncate(n);
            let chunk = BlobChunk {
                sha256: if first { sha.clone() } else { String::new() },
                data: buf,
            };
            first = false;
            if tx.send(chunk).await.is_err() || n == 0 {
                break;
            }
        }
        Ok::<(), std::io::Error>(())
    });
    let result = client
        .put_blob(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()));
    reader.await??;
    result?;
    Ok(())
}

/// Uploads bytes as a blob; returns its address.
pub async fn upload_bytes(
    client: &mut BlobServiceClient<Channel>,
    data: Vec<u8>,
) -> anyhow::Result<String> {
    let sha = hex::encode(Sha256::digest(&data));
    if missing(client, vec![sha.clone()]).await?.is_empty() {
        return Ok(sha);
    }
    let chunks: Vec<BlobChunk> = if data.is_empty() {
        vec![BlobChunk {
            sha256: sha.clone(),
            data,
        }]
    } else {
        data.chunks(CHUNK)
            .enumerate()
            .map(|(i, c)| BlobChunk {
                sha256: if i == 0 { sha.clone() } else { String::new() },
                data: c.to_vec(),
            })
            .collect()
    };
    client
        .put_blob(tokio_stream::iter(chunks))
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(sha)
}
