//! Compose projects in a test: the `muster` image built from this workspace's binary by
//! `deploy/build-image.sh` (FROM scratch, nothing pulled), a project guard that always
//! brings its project down (`docker-compose down -v`, also when the test panics), and
//! [`MusterCompose`]: `deploy/compose.yml` (3 servers, setup, 2 agents) on free ports.
//!
//! Every command this module runs is bounded by a deadline; a command that overruns is
//! killed and reported as an error.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

/// Where `deploy/` is (the workspace's).
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// What a bounded command printed.
#[derive(Debug)]
pub struct Ran {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `cmd` to its end within `limit`, capturing its output. An error if it cannot start,
/// overruns (then it is killed), or exits unsuccessfully; the error carries what it printed.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> anyhow::Result<Ran> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    // Readers on threads, so a chatty command never blocks on a full pipe.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let ran = Ran {
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    match status {
        None => bail!(
            "{shown} did not finish within {limit:?} (killed)\nstdout: {}\nstderr: {}",
            ran.stdout,
            ran.stderr
        ),
        Some(s) if !s.success() => bail!(
            "{shown} failed ({s})\nstdout: {}\nstderr: {}",
            ran.stdout,
            ran.stderr
        ),
        Some(_) => Ok(ran),
    }
}

/// [`run_bounded`] off the async worker threads.
pub async fn run_bounded_async(mut cmd: Command, limit: Duration) -> anyhow::Result<Ran> {
    tokio::task::spawn_blocking(move || run_bounded(&mut cmd, limit))
        .await
        .context("the command's task panicked")?
}

/// Checks that `docker-compose` (Compose v1, as Debian ships it) runs.
///
/// Without it: panics if `MUSTER_REQUIRE_DOCKER=1` (CI must run the container tests), else
/// prints a note and returns `false` so the test can return early.
pub fn compose_or_skip() -> bool {
    let cause = match run_bounded(
        Command::new("docker-compose").arg("version"),
        Duration::from_secs(30),
    ) {
        Ok(_) => return true,
        Err(e) => e.to_string(),
    };
    if std::env::var("MUSTER_REQUIRE_DOCKER").as_deref() == Ok("1") {
        panic!(
            "MUSTER_REQUIRE_DOCKER=1 but `docker-compose` does not run ({cause}): install it \
             (Debian: apt-get install -y docker-compose)"
        );
    }
    eprintln!(
        "skipping: `docker-compose` does not run ({cause}); install it (Debian: apt-get install \
         docker-compose), or set MUSTER_REQUIRE_DOCKER=1 to fail instead"
    );
    false
}

/// A name no other test run uses: `prefix-<pid>-<nanoseconds>` (lowercase, digits and `-`,
/// valid as a Compose project name and as an image tag).
pub fn unique_name(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// A free TCP port on 127.0.0.1 (free when asked; the OS picks it).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// An image built by `deploy/build-image.sh` under a unique tag; removed on drop.
#[derive(Debug)]
pub struct MusterImage {
    tag: String,
}

impl MusterImage {
    /// Builds the image from the binary `bin` (and its ldd libraries, plus the host's
    /// static busybox) under a unique `muster-test:<...>` tag. Nothing is pulled.
    pub async fn build(bin: &Path) -> anyhow::Result<MusterImage> {
        let tag = format!("muster-test:{}", unique_name("compose"));
        let mut cmd = Command::new("bash");
        cmd.arg(deploy_dir().join("build-image.sh"))
            .arg(bin)
            .arg(&tag);
        run_bounded_async(cmd, Duration::from_secs(300))
            .await
            .context("deploy/build-image.sh failed")?;
        Ok(MusterImage { tag })
    }

    /// Its tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl Drop for MusterImage {
    fn drop(&mut self) {
        if let Err(e) = run_bounded(
            Command::new("docker").args(["image", "rm", &self.tag]),
            Duration::from_secs(60),
        ) {
            eprintln!("could not remove the test image {}: {e}", self.tag);
        }
    }
}

/// A Compose project that is brought down (`down -v`, containers, networks and volumes) when
/// dropped, also on panic. On a panic it first prints the tail of every container's log.
#[derive(Debug)]
pub struct ComposeProject {
    name: String,
    file: PathBuf,
    env: Vec<(String, String)>,
    up: bool,
}

impl ComposeProject {
    /// `docker-compose -p NAME -f FILE up -d` with `env` set (the file's variables), bounded.
    /// If `up` fails, the project is brought down before the error returns.
    pub async fn up(
        name: &str,
        file: &Path,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<ComposeProject> {
        let project = ComposeProject {
            name: name.to_string(),
            file: file.to_path_buf(),
            env,
            up: true,
        };
        let cmd = project.compose(&["up", "-d", "--no-build"]);
        run_bounded_async(cmd, Duration::from_secs(180))
            .await
            .with_context(|| format!("bringing up the Compose project {name}"))?;
        Ok(project)
    }

    /// The project's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `docker-compose -p NAME -f FILE ARGS...` with the project's environment.
    pub fn compose(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(&self.file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// The name Compose gave the project's network `network` (`<project>_<network>`).
    pub fn network(&self, network: &str) -> String {
        format!("{}_{network}", self.name)
    }

    /// The id of the (one) container of `service`.
    pub async fn container(&self, service: &str) -> anyhow::Result<String> {
        let mut cmd = Command::new("docker");
        cmd.args(["ps", "-aq", "--no-trunc", "--filter"])
            .arg(format!("label=com.docker.compose.project={}", self.name))
            .arg("--filter")
            .arg(format!("label=com.docker.compose.service={service}"));
        let ran = run_bounded_async(cmd, Duration::from_secs(30)).await?;
        let ids: Vec<&str> = ran.stdout.split_whitespace().collect();
        match ids.as_slice() {
            [id] => Ok(id.to_string()),
            [] => bail!(
                "no container for service {service} in project {}",
                self.name
            ),
            more => bail!("{} containers for service {service}", more.len()),
        }
    }

    /// Cuts `service`'s container off the project's network `network`. Returns the
    /// container's DNS aliases there, which [`ComposeProject::connect`] needs to restore.
    pub async fn disconnect(&self, service: &str, network: &str) -> anyhow::Result<Vec<String>> {
        let id = self.container(service).await?;
        let network = self.network(network);
        let mut cmd = Command::new("docker");
        cmd.args(["inspect", "--format"])
            .arg(format!(
                "{{{{json (index .NetworkSettings.Networks \"{network}\").Aliases}}}}"
            ))
            .arg(&id);
        let ran = run_bounded_async(cmd, Duration::from_secs(30)).await?;
        let aliases: Vec<String> = serde_json::from_str::<Option<Vec<String>>>(ran.stdout.trim())
            .with_context(|| format!("reading the aliases of {service}: {}", ran.stdout))?
            .unwrap_or_default();
        let mut cmd = Command::new("docker");
        cmd.args(["network", "disconnect", &network, &id]);
        run_bounded_async(cmd, Duration::from_secs(60)).await?;
        Ok(aliases)
    }

    /// Connects `service`'s container back to `network`, with the DNS `aliases` it had
    /// (without them the others could not resolve it by its service name any more).
    pub async fn connect(
        &self,
        service: &str,
        network: &str,
        aliases: &[String],
    ) -> anyhow::Result<()> {
        let id = self.container(service).await?;
        let mut cmd = Command::new("docker");
        cmd.args(["network", "connect"]);
        // The short container id is an automatic alias: Docker adds it again by itself.
        for alias in aliases.iter().filter(|a| !id.starts_with(a.as_str())) {
            cmd.arg("--alias").arg(alias);
        }
        cmd.arg(self.network(network)).arg(&id);
        run_bounded_async(cmd, Duration::from_secs(60)).await?;
        Ok(())
    }

    /// `docker exec <service's container> ARGS...`, bounded.
    pub async fn exec(&self, service: &str, args: &[&str]) -> anyhow::Result<Ran> {
        let id = self.container(service).await?;
        let mut cmd = Command::new("docker");
        cmd.arg("exec").arg(&id).args(args);
        run_bounded_async(cmd, Duration::from_secs(30)).await
    }

    /// The last `tail` lines of every container's log.
    pub fn logs(&self, tail: usize) -> String {
        match run_bounded(
            &mut self.compose(&["logs", "--no-color", "--tail", &tail.to_string()]),
            Duration::from_secs(60),
        ) {
            Ok(ran) => ran.stdout + &ran.stderr,
            Err(e) => format!("(no logs: {e})"),
        }
    }

    /// Brings the project down now (containers, network, volumes).
    pub fn down(&mut self) -> anyhow::Result<()> {
        if !std::mem::take(&mut self.up) {
            return Ok(());
        }
        run_bounded(
            &mut self.compose(&["down", "-v", "--remove-orphans", "--timeout", "5"]),
            Duration::from_secs(180),
        )
        .map(|_| ())
        .with_context(|| format!("bringing down the Compose project {}", self.name))
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if std::thread::panicking() && self.up {
            eprintln!(
                "--- the last lines of project {}'s logs ---\n{}",
                self.name,
                self.logs(40)
            );
        }
        if let Err(e) = self.down() {
            eprintln!("{e:#}");
        }
    }
}

/// `deploy/compose.yml` from a freshly built image: servers 1-3 published on free
/// 127.0.0.1 ports, the agents' data under a temporary directory (mounted at the same path,
/// as the file requires). Dropping it brings the project down, then removes the image and
/// the directory.
#[derive(Debug)]
pub struct MusterCompose {
    /// The project (field order matters: it goes down before the image is removed).
    pub project: ComposeProject,
    ports: [u16; 3],
    _image: MusterImage,
    _agent_root: tempfile::TempDir,
}

impl MusterCompose {
    /// The private network of `deploy/compose.yml`.
    pub const NETWORK: &'static str = "muster";

    /// Builds the image from `bin` and brings the project up under a unique name.
    pub async fn up(bin: &Path) -> anyhow::Result<MusterCompose> {
        let image = MusterImage::build(bin).await?;
        let agent_root = tempfile::Builder::new()
            .prefix("muster-compose-agents-")
            .tempdir()?;
        let ports = [free_port()?, free_port()?, free_port()?];
        let env = vec![
            ("MUSTER_IMAGE".to_string(), image.tag().to_string()),
            ("MUSTER_PORT".to_string(), ports[0].to_string()),
            ("MUSTER_PORT2".to_string(), ports[1].to_string()),
            ("MUSTER_PORT3".to_string(), ports[2].to_string()),
            (
                "MUSTER_AGENT_ROOT".to_string(),
                agent_root.path().display().to_string(),
            ),
        ];
        let project = ComposeProject::up(
            &unique_name("muster-compose"),
            &deploy_dir().join("compose.yml"),
            env,
        )
        .await?;
        let compose = MusterCompose {
            project,
            ports,
            _image: image,
            _agent_root: agent_root,
        };
        compose.login().await?;
        Ok(compose)
    }

    /// Reads the cluster CA (the `certs` service made it) and the first admin's token from
    /// server 1 once they work, and registers both for every server (bounded: 60 s).
    async fn login(&self) -> anyhow::Result<()> {
        let ca = self._agent_root.path().join("ca.pem");
        for _ in 0..120 {
            if !ca.exists()
                && let Ok(out) = self
                    .project
                    .exec(&Self::service(1), &["cat", "/tls/ca.pem"])
                    .await
                && out.stdout.contains("BEGIN CERTIFICATE")
            {
                std::fs::write(&ca, &out.stdout)?;
                crate::access::register_ca(&self.urls(), &ca);
            }
            if ca.exists()
                && let Ok(out) = self
                    .project
                    .exec(&Self::service(1), &["cat", "/data/admin-token"])
                    .await
            {
                let token = out.stdout.trim().to_string();
                let credentials = crate::access::with_tls(
                    &self.urls(),
                    muster_client::Credentials::bearer(&token)?,
                );
                if let Ok(mut c) = muster_client::connect(&self.urls(), credentials).await
                    && c.access
                        .who_am_i(muster_proto::v1::WhoAmIRequest {})
                        .await
                        .is_ok()
                {
                    crate::access::register(&self.urls(), &token);
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        anyhow::bail!(
            "server 1 made no working admin token within 60 s:\n{}",
            self.project.logs(50)
        )
    }

    /// Server `id`'s (1, 2 or 3) URL on 127.0.0.1.
    pub fn url(&self, id: u64) -> String {
        let i = usize::try_from(id).expect("a small id") - 1;
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    /// Every server's URL, comma-separated (what `--server` takes).
    pub fn urls(&self) -> String {
        (1..=3).map(|id| self.url(id)).collect::<Vec<_>>().join(",")
    }

    /// The cluster CA's certificate, as a file on this machine.
    pub fn ca_file(&self) -> PathBuf {
        self._agent_root.path().join("ca.pem")
    }

    /// The Compose service of server `id`.
    pub fn service(id: u64) -> String {
        format!("server{id}")
    }
}
