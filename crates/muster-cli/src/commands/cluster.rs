//! `muster cluster ...`: the coordinator cluster's status and membership.

use std::time::Duration;

use muster_proto::v1::{self, cluster_service_client::ClusterServiceClient};
use serde_json::json;

use crate::cli::{ClusterCommand, OutputFormat};
use crate::output::{print_json, table};
use muster_client::{Channel, Servers, status};

/// `servers` as the cluster commands reach them: 2 s to connect to each, 90 s for an
/// answer (adding a server waits for it to catch up).
fn reach(servers: Servers) -> Servers {
    servers
        .with_connect_timeout(Duration::from_secs(2))
        .with_request_timeout(Duration::from_secs(90))
}

async fn connect(servers: &Servers) -> anyhow::Result<ClusterServiceClient<Channel>> {
    let (_, channel) = servers.connect().await?;
    Ok(ClusterServiceClient::new(channel))
}

/// The first server of `--server` that answers.
async fn any(servers: &str) -> anyhow::Result<ClusterServiceClient<Channel>> {
    let list = Servers::parse(servers).with_credentials(crate::client_credentials(servers)?);
    connect(&reach(list)).await
}

/// The leader, found through any server (membership changes go there).
async fn leader(servers: &str) -> anyhow::Result<ClusterServiceClient<Channel>> {
    let credentials = crate::client_credentials(servers)?;
    let mut c = connect(&reach(
        Servers::parse(servers).with_credentials(credentials.clone()),
    ))
    .await?;
    let s = c
        .status(v1::ClusterStatusRequest::default())
        .await
        .map_err(status)?
        .into_inner();
    if s.role == "leader" {
        return Ok(c);
    }
    let addr = s
        .leader_address
        .ok_or_else(|| anyhow::anyhow!("the cluster has no leader right now; retry in a second"))?;
    connect(&reach(Servers::new([addr]).with_credentials(credentials))).await
}

pub async fn run(servers: &str, output: OutputFormat, cmd: ClusterCommand) -> anyhow::Result<()> {
    let result = match cmd {
        ClusterCommand::Status => return status_all(servers, output).await,
        ClusterCommand::Key => {
            // 48 random letters and digits (285 bits) from the thread's CSPRNG.
            const ALPHABET: &[u8] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            let key: String = (0..48)
                .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
                .collect();
            println!("{key}");
            return Ok(());
        }
        ClusterCommand::AddServer { id, address } => {
            eprintln!(
                "Adding server {id} at {address}: as a learner until it has caught up, then as a voter…"
            );
            leader(servers)
                .await?
                .add_server(v1::AddServerRequest { id, address })
                .await
        }
        ClusterCommand::RemoveServer { id } => {
            leader(servers)
                .await?
                .remove_server(v1::RemoveServerRequest { id })
                .await
        }
        ClusterCommand::Backup { out, no_blobs } => {
            return backup(servers, output, &out, no_blobs).await;
        }
        ClusterCommand::TransferLeader { to } => {
            leader(servers)
                .await?
                .transfer_leader(v1::TransferLeaderRequest { to })
                .await
        }
    };
    let s = result.map_err(status)?.into_inner();
    if output == OutputFormat::Json {
        print_json(&status_json(&s, &[]));
    } else {
        println!(
            "Done. Leader: {}; voters: {}.",
            s.leader
                .map(|l| l.to_string())
                .unwrap_or_else(|| "none".into()),
            s.members
                .iter()
                .filter(|m| m.voter)
                .map(|m| m.id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

fn status_json(
    s: &v1::ClusterStatus,
    each: &[(u64, Option<v1::ClusterStatus>)],
) -> serde_json::Value {
    json!({
        "leader": s.leader, "term": s.term, "commit_index": s.commit_index,
        "members": s.members.iter().map(|m| {
            let own = each.iter().find(|(id, _)| *id == m.id).and_then(|(_, st)| st.as_ref());
            json!({
                "id": m.id, "address": m.address, "voter": m.voter,
                "role": own.map(|o| o.role.clone()), "term": own.map(|o| o.term),
                "commit_index": own.map(|o| o.commit_index), "applied_index": own.map(|o| o.applied_index),
                "lag": own.map(|o| s.commit_index.saturating_sub(o.applied_index)),
                "reachable": own.is_some(),
            })
        }).collect::<Vec<_>>(),
    })
}

/// Every member's own view, so the table shows each one's role, term and indexes.
async fn status_all(servers: &str, output: OutputFormat) -> anyhow::Result<()> {
    let mut c = leader(servers).await.or(any(servers).await)?;
    // The server asks the members: it reaches them by the addresses they use among
    // themselves, which this client (outside their network, say) may not.
    let s = c
        .status(v1::ClusterStatusRequest {
            members: true,
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    let each: Vec<(u64, Option<v1::ClusterStatus>)> = s
        .members
        .iter()
        .map(|m| (m.id, s.views.iter().find(|v| v.id == m.id).cloned()))
        .collect();
    if output == OutputFormat::Json {
        print_json(&status_json(&s, &each));
        return Ok(());
    }
    println!(
        "leader {}  term {}  commit {}",
        s.leader
            .map(|l| l.to_string())
            .unwrap_or_else(|| "none".into()),
        s.term,
        s.commit_index
    );
    let mut t = table(&[
        "ID", "ADDRESS", "ROLE", "VOTER", "TERM", "COMMIT", "APPLIED", "LAG",
    ]);
    for (m, (_, own)) in s.members.iter().zip(&each) {
        match own {
            Some(o) => t.add_row(vec![
                m.id.to_string(),
                m.address.clone(),
                o.role.clone(),
                m.voter.to_string(),
                o.term.to_string(),
                o.commit_index.to_string(),
                o.applied_index.to_string(),
                s.commit_index.saturating_sub(o.applied_index).to_string(),
            ]),
            None => t.add_row(vec![
                m.id.to_string(),
                m.address.clone(),
                "unreachable".into(),
                m.voter.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]),
        };
    }
    println!("{t}");
    Ok(())
}

/// `muster cluster backup --out FILE`: streams the backup to `FILE.partial`, renames it,
/// and says what it holds.
async fn backup(
    servers: &str,
    output: OutputFormat,
    out: &std::path::Path,
    no_blobs: bool,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    use std::io::Write;
    // No deadline on the answer: a backup with its blobs takes as long as they do.
    let list = Servers::parse(servers)
        .with_credentials(crate::client_credentials(servers)?)
        .with_connect_timeout(Duration::from_secs(2));
    let mut client = connect(&list).await?;
    let mut stream = client
        .backup(v1::BackupRequest { no_blobs })
        .await
        .map_err(status)?
        .into_inner();
    let partial = out.with_extension("partial");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&partial)
            .map_err(|e| anyhow::anyhow!("--out: cannot create {}: {e}", partial.display()))?,
    );
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(status)?;
        bytes += chunk.data.len() as u64;
        file.write_all(&chunk.data)?;
    }
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    // What the backup says of itself (its first entry).
    let mut archive = tar::Archive::new(std::fs::File::open(&partial)?);
    let info: serde_json::Value = archive
        .entries()?
        .next()
        .and_then(|e| e.ok())
        .and_then(|e| serde_json::from_reader(e).ok())
        .ok_or_else(|| anyhow::anyhow!("the server's answer is not a muster backup"))?;
    std::fs::rename(&partial, out)?;
    if output == OutputFormat::Json {
        print_json(&json!({"file": out, "bytes": bytes, "backup": info}));
        return Ok(());
    }
    println!(
        "Backed up the state at index {} and {} blobs ({}) from server {} to {}",
        info["applied_index"],
        info["blobs"],
        crate::snapshot::human_bytes(bytes),
        info["server_id"],
        out.display()
    );
    if let Some(missing) = info["missing_blobs"].as_array().filter(|m| !m.is_empty()) {
        eprintln!(
            "warning: {} blobs the state refers to were on no server that answered, so they are not in the backup (the runs or assets that use them will not download)",
            missing.len()
        );
    }
    eprintln!(
        "Restore it into an empty data directory: muster server --data-dir DIR --restore-from {}",
        out.display()
    );
    Ok(())
}
