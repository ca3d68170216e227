//! Fetches a run's http(s) `uri_file` inputs into its working directory, through the
//! node's cache: `cache/urls/<sha256 of the URL>` holds the last body and `<…>.etag` its
//! ETag, so a file the server says is unchanged (`If-None-Match` → 304) is not downloaded
//! again. Each download is capped at [`MAX_URL_INPUT_BYTES`]; a body is written to a
//! temporary file and renamed into the cache only when complete, so attempts on the same
//! node never see half a file.
//!
//! reqwest is the HTTP client (rustls with ring, Mozilla's roots built in; `HTTPS_PROXY`
//! and friends honoured).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// The largest file one URL input may be.
pub(crate) const MAX_URL_INPUT_BYTES: u64 = 16 << 30;

/// Why a URL input could not be placed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    /// The request failed (no answer, TLS, a broken body).
    #[error("input {input}: cannot fetch {url}: {cause}")]
    Http {
        /// The input.
        input: String,
        /// Its URL.
        url: String,
        /// Why.
        cause: String,
    },
    /// The server answered with an error status.
    #[error("input {input}: {url} answered {status}")]
    Status {
        /// The input.
        input: String,
        /// Its URL.
        url: String,
        /// The status line.
        status: String,
    },
    /// The body is over the cap.
    #[error(
        "input {input}: {url} is larger than the {} a URL input may be: put it on a file system the nodes share",
        muster_core::resources::format_bytes(MAX_URL_INPUT_BYTES)
    )]
    TooLarge {
        /// The input.
        input: String,
        /// Its URL.
        url: String,
    },
    /// A file could not be written.
    #[error("input {input}: cannot write {}: {source}", path.display())]
    Write {
        /// The input.
        input: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The client for URL inputs: 10 s to connect, 60 s without a byte ends a download.
fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("muster-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

/// Places each input (name → URL) at `dest/<muster_core::spec::url_input_path>`.
pub(crate) async fn place(
    inputs: &BTreeMap<String, String>,
    cache: &Path,
    dest: &Path,
) -> Result<(), FetchError> {
    if inputs.is_empty() {
        return Ok(());
    }
    let client = client().map_err(|cause| FetchError::Http {
        input: String::new(),
        url: String::new(),
        cause,
    })?;
    for (name, url) in inputs {
        let cached = fetch_cached(&client, name, url, cache).await?;
        let target = dest.join(muster_core::spec::url_input_path(name, url));
        let write = |source| FetchError::Write {
            input: name.clone(),
            path: target.clone(),
            source,
        };
        if let Some(dir) = target.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(write)?;
        }
        // A copy, not a link: the run may change its inputs without touching the cache.
        tokio::fs::copy(&cached, &target).await.map_err(write)?;
    }
    Ok(())
}

/// The cached body of `url`, revalidated or downloaded now.
async fn fetch_cached(
    client: &reqwest::Client,
    name: &str,
    url: &str,
    cache: &Path,
) -> Result<PathBuf, FetchError> {
    let http = |cause: String| FetchError::Http {
        input: name.to_string(),
        url: url.to_string(),
        cause,
    };
    let key = hex::encode(Sha256::digest(url.as_bytes()));
    let body = cache.join(&key);
    let etag_file = cache.join(format!("{key}.etag"));
    let write = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Write {
            input: name.to_string(),
            path,
            source,
        }
    };
    tokio::fs::create_dir_all(cache)
        .await
        .map_err(write(cache))?;
    let etag = match tokio::fs::read_to_string(&etag_file).await {
        Ok(e) if tokio::fs::try_exists(&body).await.unwrap_or(false) => Some(e),
        _ => None,
    };
    let mut request = client.get(url);
    if let Some(e) = &etag {
        request = request.header(reqwest::header::IF_NONE_MATCH, e.trim());
    }
    let response = request.send().await.map_err(|e| http(error_chain(&e)))?;
    if response.status() == reqwest::StatusCode::NOT_MODIFIED && etag.is_some() {
        tracing::debug!(input = name, url, "unchanged: served from the node's cache");
        return Ok(body);
    }
    if !response.status().is_success() {
        return Err(FetchError::Status {
            input: name.to_string(),
            url: url.to_string(),
            status: response.status().to_string(),
        });
    }
    let too_large = || FetchError::TooLarge {
        input: name.to_string(),
        url: url.to_string(),
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_URL_INPUT_BYTES)
    {
        return Err(too_large());
    }
    let new_etag = response
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let part = cache.join(format!(
        "{key}.{}.{:016x}.part",
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut file = tokio::fs::File::create(&part).await.map_err(write(&part))?;
    let mut stream = response.bytes_stream();
    let mut total = 0u64;
    let result = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| http(error_chain(&e)))?;
            total += chunk.len() as u64;
            if total > MAX_URL_INPUT_BYTES {
                return Err(too_large());
            }
            file.write_all(&chunk).await.map_err(write(&part))?;
        }
        file.sync_all().await.map_err(write(&part))?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(e);
    }
    tokio::fs::rename(&part, &body)
        .await
        .map_err(write(&body))?;
    match new_etag {
        Some(e) => tokio::fs::write(&etag_file, e)
            .await
            .map_err(write(&etag_file))?,
        None => {
            let _ = tokio::fs::remove_file(&etag_file).await;
        }
    }
    tracing::info!(input = name, url, bytes = total, "fetched a URL input");
    Ok(body)
}

/// An error with its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
