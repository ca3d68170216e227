//! Blob transfers over BlobService, streamed in 1 MiB chunks: uploads that send only what
//! the server lacks, downloads that check the digest (into a file through a temporary one,
//! into memory, or as a stream of chunks). The CLI uploads snapshots and downloads outputs
//! with it, the agent fetches snapshots and inputs and uploads outputs, and a server copies
//! blobs to its peers with a [`Blobs::replica`] handle.

use std::path::Path;

use crate::{Channel, ClientError};
use futures::StreamExt;
use futures::stream::BoxStream;
use muster_proto::v1::blob_service_client::BlobServiceClient;
use muster_proto::v1::{BlobChunk, GetBlobRequest, MissingBlobsRequest};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// The size of one chunk of an upload.
pub const CHUNK: usize = 1 << 20;

/// Requests between servers carry this metadata key, so a server does not copy a replica
/// on again (muster-server's replication reads it).
pub const REPLICA_HEADER: &str = "muster-replica";

/// Hashes asked about in one MissingBlobs request.
const MISSING_BATCH: usize = 5_000;

/// SHA-256 of a file, lowercase hex.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// SHA-256 of bytes, lowercase hex (a blob's address).
pub fn hash_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A BlobService client and how its requests are marked: by a client (the CLI, an agent),
/// or by a server copying a blob to a peer ([`Blobs::replica`]).
#[derive(Debug, Clone)]
pub struct Blobs {
    client: BlobServiceClient<Channel>,
    replica: bool,
}

impl From<BlobServiceClient<Channel>> for Blobs {
    fn from(client: BlobServiceClient<Channel>) -> Blobs {
        Blobs::new(client)
    }
}

impl Blobs {
    /// Transfers of a client.
    pub fn new(client: BlobServiceClient<Channel>) -> Blobs {
        Blobs {
            client,
            replica: false,
        }
    }

    /// Transfers of a channel, accepting chunks and answers up to 16 MiB.
    pub fn connect(channel: Channel) -> Blobs {
        Blobs::new(BlobServiceClient::new(channel).max_decoding_message_size(16 << 20))
    }

    /// Transfers between servers: every request carries [`REPLICA_HEADER`], so the peer
    /// stores the copy without replicating it on.
    pub fn replica(client: BlobServiceClient<Channel>) -> Blobs {
        Blobs {
            client,
            replica: true,
        }
    }

    /// The generated client, for a call this type does not wrap.
    pub fn raw(&mut self) -> &mut BlobServiceClient<Channel> {
        &mut self.client
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        if self.replica {
            req.metadata_mut().insert(
                REPLICA_HEADER,
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        req
    }

    /// The subset of `hashes` the server lacks (asked in batches of 5,000).
    pub async fn missing(&mut self, hashes: Vec<String>) -> Result<Vec<String>, ClientError> {
        let mut out = Vec::new();
        for batch in hashes.chunks(MISSING_BATCH) {
            let req = self.request(MissingBlobsRequest {
                sha256: batch.to_vec(),
            });
            out.extend(self.client.missing_blobs(req).await?.into_inner().sha256);
        }
        Ok(out)
    }

    /// Streams what `reader` yields as blob `sha256` (the caller hashed it; the server
    /// checks the digest), in [`CHUNK`]-sized chunks read as they are sent. A server
    /// copying a blob to a peer passes the opened blob file.
    pub async fn upload_stream<R>(&mut self, sha256: &str, mut reader: R) -> Result<(), ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let sha = sha256.to_string();
        let read = tokio::spawn(async move {
            let mut first = true;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = read_full(&mut reader, &mut buf).await?;
                if n == 0 && !first {
                    return Ok::<(), std::io::Error>(());
                }
                buf.truncate(n);
                let chunk = BlobChunk {
                    sha256: if first { sha.clone() } else { String::new() },
                    data: buf,
                };
                first = false;
                if tx.send(chunk).await.is_err() || n < CHUNK {
                    return Ok(());
                }
            }
        });
        let req = self.request(tokio_stream::wrappers::ReceiverStream::new(rx));
        let sent = self.client.put_blob(req).await;
        let read = read.await.map_err(std::io::Error::other).and_then(|r| r);
        // A failed read ends the stream early; the server then refuses the short blob,
        // but the read error is the one that says what went wrong.
        read.map_err(|error| ClientError::ReadSource {
            sha256: sha256.to_string(),
            error,
        })?;
        sent?;
        Ok(())
    }

    /// Uploads the file at `path` as blob `sha256` (the caller hashed it).
    pub async fn upload_file(&mut self, sha256: &str, path: &Path) -> Result<(), ClientError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|error| ClientError::Io {
                action: "read",
                path: path.to_path_buf(),
                error,
            })?;
        self.upload_stream(sha256, file).await.map_err(|e| match e {
            ClientError::ReadSource { error, .. } => ClientError::Io {
                action: "read",
                path: path.to_path_buf(),
                error,
            },
            other => other,
        })
    }

    /// Uploads bytes as a blob unless the server has it; returns its address.
    pub async fn upload_bytes(&mut self, data: Vec<u8>) -> Result<String, ClientError> {
        let sha = hash_bytes(&data);
        if self.missing(vec![sha.clone()]).await?.is_empty() {
            return Ok(sha);
        }
        self.put_bytes(data).await
    }

    /// Uploads `data` without asking first whether the server has it (the caller asked, in
    /// one `missing` call with other blobs); returns its SHA-256.
    pub async fn put_bytes(&mut self, data: Vec<u8>) -> Result<String, ClientError> {
        let sha = hash_bytes(&data);
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
        let req = self.request(tokio_stream::iter(chunks));
        self.client.put_blob(req).await?;
        Ok(sha)
    }

    /// Blob `sha256` as a stream of chunks, as the server sends them. The digest is not
    /// checked here: the consumer hashes what it keeps (a server's blob writer does).
    pub async fn download_stream(
        &mut self,
        sha256: &str,
    ) -> Result<BoxStream<'static, Result<Vec<u8>, ClientError>>, ClientError> {
        let blob_error = |sha256: &str, status| ClientError::Blob {
            sha256: sha256.to_string(),
            status,
        };
        let req = self.request(GetBlobRequest {
            sha256: sha256.to_string(),
        });
        let stream = self
            .client
            .get_blob(req)
            .await
            .map_err(|s| blob_error(sha256, s))?
            .into_inner();
        let sha = sha256.to_string();
        Ok(stream
            .map(move |chunk| chunk.map(|c| c.data).map_err(|s| blob_error(&sha, s)))
            .boxed())
    }

    /// Downloads blob `sha256` into `dest` through a temporary file beside it, which
    /// becomes `dest` only once the digest checks; returns its size.
    pub async fn download(&mut self, sha256: &str, dest: &Path) -> Result<u64, ClientError> {
        self.download_observed(sha256, dest, |_| {}).await
    }

    /// [`Blobs::download`], calling `received` with the size of each chunk as it arrives
    /// (a progress bar's feed).
    pub async fn download_observed(
        &mut self,
        sha256: &str,
        dest: &Path,
        mut received: impl FnMut(u64),
    ) -> Result<u64, ClientError> {
        let mut stream = self.download_stream(sha256).await?;
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |error| ClientError::Io {
                action,
                path,
                error,
            }
        };
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io("create", dir))?;
        }
        let tmp = dest.with_extension(format!("part{}", rand::random::<u32>()));
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(io("create", &tmp))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let got: Result<(), ClientError> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                received(chunk.len() as u64);
                file.write_all(&chunk).await.map_err(io("write", &tmp))?;
            }
            file.flush().await.map_err(io("write", &tmp))
        }
        .await;
        drop(file);
        if let Err(e) = got {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ClientError::Corrupted {
                sha256: sha256.to_string(),
                actual,
            });
        }
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(io("write", dest))?;
        Ok(size)
    }

    /// Downloads a small blob (a manifest) into memory; the digest is checked.
    pub async fn download_bytes(&mut self, sha256: &str) -> Result<Vec<u8>, ClientError> {
        let mut stream = self.download_stream(sha256).await?;
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?);
        }
        let actual = hash_bytes(&data);
        if actual != sha256 {
            return Err(ClientError::Corrupted {
                sha256: sha256.to_string(),
                actual,
            });
        }
        Ok(data)
    }
}

/// Reads until `buf` is full or the reader ends; returns how much was read.
async fn read_full<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use muster_proto::v1::blob_service_server::{BlobService, BlobServiceServer};
    use muster_proto::v1::{self};
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    /// An in-memory blob store that checks digests as muster-server does, and records
    /// whether each request was marked as a replica copy.
    #[derive(Default, Clone)]
    struct Memory {
        blobs: Arc<Mutex<HashMap<String, Vec<u8>>>>,
        chunks_received: Arc<Mutex<Vec<usize>>>,
        replica_marks: Arc<Mutex<Vec<bool>>>,
        corrupt: bool,
    }

    impl Memory {
        fn mark<T>(&self, req: &Request<T>) {
            self.replica_marks
                .lock()
                .unwrap()
                .push(req.metadata().contains_key(REPLICA_HEADER));
        }
    }

    #[tonic::async_trait]
    impl BlobService for Memory {
        async fn missing_blobs(
            &self,
            req: Request<v1::MissingBlobsRequest>,
        ) -> Result<Response<v1::MissingBlobsResponse>, Status> {
            self.mark(&req);
            let blobs = self.blobs.lock().unwrap();
            let sha256 = req
                .into_inner()
                .sha256
                .into_iter()
                .filter(|s| !blobs.contains_key(s))
                .collect();
            Ok(Response::new(v1::MissingBlobsResponse { sha256 }))
        }

        async fn put_blob(
            &self,
            req: Request<Streaming<BlobChunk>>,
        ) -> Result<Response<v1::PutBlobResponse>, Status> {
            self.mark(&req);
            let mut stream = req.into_inner();
            let mut sha = String::new();
            let mut data = Vec::new();
            while let Some(chunk) = stream.message().await? {
                if sha.is_empty() {
                    sha = chunk.sha256;
                }
                self.chunks_received.lock().unwrap().push(chunk.data.len());
                data.extend_from_slice(&chunk.data);
            }
            if hash_bytes(&data) != sha {
                return Err(Status::invalid_argument(
                    "the data does not hash to its sha256",
                ));
            }
            let size = data.len() as u64;
            self.blobs.lock().unwrap().insert(sha.clone(), data);
            Ok(Response::new(v1::PutBlobResponse { sha256: sha, size }))
        }

        type GetBlobStream = futures::stream::Iter<std::vec::IntoIter<Result<BlobChunk, Status>>>;

        async fn get_blob(
            &self,
            req: Request<v1::GetBlobRequest>,
        ) -> Result<Response<Self::GetBlobStream>, Status> {
            self.mark(&req);
            let sha = req.into_inner().sha256;
            let mut data = self
                .blobs
                .lock()
                .unwrap()
                .get(&sha)
                .cloned()
                .ok_or_else(|| Status::not_found(format!("no blob {sha}")))?;
            if self.corrupt {
                data.push(b'!');
            }
            let chunks: Vec<_> = data
                .chunks(1000)
                .map(|c| {
                    Ok(BlobChunk {
                        sha256: String::new(),
                        data: c.to_vec(),
                    })
                })
                .collect();
            Ok(Response::new(futures::stream::iter(chunks)))
        }
    }

    async fn serve(memory: Memory) -> Channel {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(BlobServiceServer::new(memory))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        crate::Credentials::none().attach(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
    }

    #[tokio::test]
    async fn a_file_goes_up_in_chunks_and_comes_back_checked() {
        let memory = Memory::default();
        let mut blobs = Blobs::connect(serve(memory.clone()).await);
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..CHUNK * 2 + 7).map(|i| (i % 251) as u8).collect();
        let src = tmp.path().join("weights.bin");
        std::fs::write(&src, &data).unwrap();
        let sha = hash_file(&src).unwrap();
        assert_eq!(
            blobs.missing(vec![sha.clone()]).await.unwrap(),
            [sha.as_str()]
        );
        blobs.upload_file(&sha, &src).await.unwrap();
        assert_eq!(*memory.chunks_received.lock().unwrap(), [CHUNK, CHUNK, 7]);
        assert!(blobs.missing(vec![sha.clone()]).await.unwrap().is_empty());

        let dest = tmp.path().join("cache/ab/copy");
        assert_eq!(
            blobs.download(&sha, &dest).await.unwrap(),
            data.len() as u64
        );
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        assert_eq!(blobs.download_bytes(&sha).await.unwrap(), data);
        assert!(!memory.replica_marks.lock().unwrap().iter().any(|m| *m));
    }

    #[tokio::test]
    async fn bytes_are_uploaded_once_and_an_empty_blob_is_one_chunk() {
        let memory = Memory::default();
        let mut blobs = Blobs::connect(serve(memory.clone()).await);
        let sha = blobs.upload_bytes(b"manifest".to_vec()).await.unwrap();
        assert_eq!(sha, hash_bytes(b"manifest"));
        blobs.upload_bytes(b"manifest".to_vec()).await.unwrap();
        assert_eq!(memory.chunks_received.lock().unwrap().len(), 1, "sent once");
        let empty = blobs.upload_bytes(Vec::new()).await.unwrap();
        assert_eq!(blobs.download_bytes(&empty).await.unwrap(), b"");
    }

    #[tokio::test]
    async fn a_corrupted_download_leaves_no_file_and_is_retryable() {
        let memory = Memory {
            corrupt: true,
            ..Memory::default()
        };
        let mut blobs = Blobs::connect(serve(memory.clone()).await);
        let sha = blobs.upload_bytes(b"weights".to_vec()).await.unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("w");
        let err = blobs.download(&sha, &dest).await.unwrap_err();
        assert!(matches!(err, ClientError::Corrupted { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);

        let err = blobs.download_bytes(&"0".repeat(64)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("blob {}: no blob {}", "0".repeat(64), "0".repeat(64))
        );
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn a_replica_handle_marks_every_request_and_streams_a_reader() {
        let memory = Memory::default();
        let channel = serve(memory.clone()).await;
        let mut blobs = Blobs::replica(BlobServiceClient::new(channel));
        let data = vec![7u8; CHUNK + 1];
        let sha = hash_bytes(&data);
        assert_eq!(
            blobs.missing(vec![sha.clone()]).await.unwrap(),
            [sha.as_str()]
        );
        blobs
            .upload_stream(&sha, std::io::Cursor::new(data.clone()))
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut chunks = blobs.download_stream(&sha).await.unwrap();
        while let Some(c) = chunks.next().await {
            got.extend(c.unwrap());
        }
        assert_eq!(got, data);
        assert_eq!(*memory.replica_marks.lock().unwrap(), [true, true, true]);

        // A stream that does not hash to its address is refused by the server.
        let err = blobs
            .upload_stream(&"0".repeat(64), std::io::Cursor::new(b"x".to_vec()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    }
}
