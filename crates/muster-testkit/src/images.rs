//! Docker for tests: find the engine (or skip), build the tiny busybox test image from the
//! host's `/bin/busybox` (no registry needed), and clean up containers by label.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder, TagImageOptionsBuilder,
};
use futures::StreamExt;
use tokio::sync::OnceCell;

/// The Docker client crate, for tests that inspect containers themselves.
pub use bollard;

/// The image [`busybox_image`] builds: `FROM scratch` with a static busybox as `/bin/*`.
pub const BUSYBOX_IMAGE: &str = "muster-test-busybox:latest";

/// The Dockerfile of [`BUSYBOX_IMAGE`].
const DOCKERFILE: &str = "FROM scratch\n\
COPY busybox /bin/busybox\n\
RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n";

/// Where the static busybox comes from.
const HOST_BUSYBOX: &str = "/bin/busybox";

/// Connects to the Docker engine (DOCKER_HOST honoured, API version negotiated).
///
/// Without an engine: panics if `MUSTER_REQUIRE_DOCKER=1` (CI that must run the Docker
/// tests), else prints a note and returns `None` so the test can return early.
pub async fn docker_or_skip() -> Option<Docker> {
    let connected = async {
        let docker = Docker::connect_with_defaults()?;
        let docker = docker.negotiate_version().await?;
        docker.ping().await?;
        Ok::<_, EngineError>(docker)
    };
    let cause = match tokio::time::timeout(std::time::Duration::from_secs(10), connected).await {
        Ok(Ok(docker)) => return Some(docker),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 10 s".to_string(),
    };
    let host =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    if std::env::var("MUSTER_REQUIRE_DOCKER").as_deref() == Ok("1") {
        panic!("MUSTER_REQUIRE_DOCKER=1 but no Docker engine: {host}: {cause}");
    }
    eprintln!(
        "skipping: no Docker engine at {host} ({cause}); set MUSTER_REQUIRE_DOCKER=1 to fail instead"
    );
    None
}

/// Makes sure [`BUSYBOX_IMAGE`] exists on the engine and returns its name.
///
/// Built once per process, and only if absent. Several test binaries may call this at
/// once: each builds under a unique tag and then tags the result (tagging over an existing
/// tag is harmless, and the images are identical).
pub async fn busybox_image(docker: &Docker) -> anyhow::Result<String> {
    static BUILT: OnceCell<()> = OnceCell::const_new();
    BUILT
        .get_or_try_init(|| async {
            if docker.inspect_image(BUSYBOX_IMAGE).await.is_ok() {
                return Ok(());
            }
            build_busybox(docker).await
        })
        .await?;
    Ok(BUSYBOX_IMAGE.to_string())
}

async fn build_busybox(docker: &Docker) -> anyhow::Result<()> {
    let busybox = std::fs::read(HOST_BUSYBOX).with_context(|| {
        format!(
            "cannot read {HOST_BUSYBOX} to build {BUSYBOX_IMAGE}: install Debian's busybox-static \
             (a statically linked busybox)"
        )
    })?;
    let context = build_context(&busybox).context("making the build context")?;

    build_and_tag(docker, context, BUSYBOX_IMAGE).await
}

/// Builds the image of a tar `context` (with a `Dockerfile`) under a unique tag, then tags
/// it `image`: concurrent builders never see a half-tagged image.
pub(crate) async fn build_and_tag(
    docker: &Docker,
    context: Vec<u8>,
    image: &str,
) -> anyhow::Result<()> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let (repo, tag) = image.split_once(':').expect("an image with a tag");
    let unique = format!("{repo}-build:{}-{nanos}", std::process::id());
    let options = BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(&unique)
        .rm(true)
        .forcerm(true)
        .build();
    let mut output = docker.build_image(options, None, Some(bollard::body_full(context.into())));
    let mut transcript = String::new();
    while let Some(item) = output.next().await {
        match item {
            Ok(info) => {
                if let Some(s) = info.stream {
                    transcript.push_str(&s);
                }
            }
            Err(e) => bail!("building {image} failed: {e}\n{transcript}"),
        }
    }
    let tagging = TagImageOptionsBuilder::default()
        .repo(repo)
        .tag(tag)
        .build();
    let tagged = docker.tag_image(&unique, Some(tagging)).await;
    let remove = RemoveImageOptionsBuilder::default().noprune(true).build();
    let _ = docker.remove_image(&unique, Some(remove), None).await;
    tagged.with_context(|| format!("tagging the built image as {image}"))?;
    Ok(())
}

/// A tar with the Dockerfile and the busybox binary.
fn build_context(busybox: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, mode: u32, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        tar.append_data(&mut header, name, data)
    };
    add("Dockerfile", 0o644, DOCKERFILE.as_bytes())?;
    add("busybox", 0o755, busybox)?;
    tar.into_inner()
}

/// Removes (forcibly) every container labelled `key=value`; for test cleanup.
pub async fn remove_containers_labelled(
    docker: &Docker,
    key: &str,
    value: &str,
) -> anyhow::Result<()> {
    let filters = HashMap::from([("label", vec![format!("{key}={value}")])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let list = docker
        .list_containers(Some(options))
        .await
        .context("listing containers")?;
    for id in list.into_iter().filter_map(|c| c.id) {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match docker.remove_container(&id, Some(options)).await {
            Ok(()) => {}
            Err(EngineError::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(e).with_context(|| format!("removing container {id}")),
        }
    }
    Ok(())
}
