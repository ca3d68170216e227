//! `muster login|logout|whoami|token|workspace|role|audit`: who you are to the cluster.

use std::io::Read;
use std::time::Duration;

use anyhow::Context;
use muster_client::{Credentials, status};
use muster_proto::v1;
use serde_json::json;

use crate::cli::{
    LoginArgs, OutputFormat, RoleCommand, TlsCommand, TokenCommand, WorkspaceCommand,
};
use crate::connect;
use crate::credentials::{remove_token, store_token};
use crate::output::{print_json, table};

fn when(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        }
        None => "-".into(),
    }
}

/// `muster login`: reads a token (a file, or standard input), checks it with the server,
/// and keeps it for `--server`.
pub async fn login(server: &str, args: LoginArgs) -> anyhow::Result<()> {
    let token = match &args.token_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --token-file {}", path.display()))?,
        None => {
            eprintln!("Paste your API token (mst_…) and press Enter:");
            let mut line = String::new();
            std::io::stdin()
                .read_to_string(&mut line)
                .context("cannot read the token from standard input")?;
            line
        }
    };
    let token = token.trim().to_string();
    anyhow::ensure!(
        token.starts_with(muster_core::access::TOKEN_PREFIX),
        "that is not an API token: tokens look like mst_<id>_<secret> (`muster token create` makes one)"
    );
    let credentials = crate::with_ca(Credentials::bearer(&token)?)?;
    let mut c = muster_client::connect(server, credentials).await?;
    let me = c
        .access
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let path = store_token(server, &token)?;
    println!(
        "logged in to {} as {} (token kept in {})",
        c.url,
        me.principal,
        path.display()
    );
    Ok(())
}

/// `muster logout`.
pub fn logout(server: &str) -> anyhow::Result<()> {
    match remove_token(server)? {
        0 => println!("no token was kept for {server}"),
        _ => println!("forgot the token for {server}"),
    }
    Ok(())
}

fn grants_table(grants: &[v1::Grant]) -> String {
    let mut t = table(&["USER", "ROLE", "WORKSPACE"]);
    for g in grants {
        let scope = if g.workspace.is_empty() {
            "(cluster-wide)".to_string()
        } else {
            g.workspace.clone()
        };
        t.add_row(vec![g.user.clone(), g.role.clone(), scope]);
    }
    t.to_string()
}

fn grants_json(grants: &[v1::Grant]) -> serde_json::Value {
    json!(grants
        .iter()
        .map(|g| json!({"user": g.user, "role": g.role, "workspace": (!g.workspace.is_empty()).then_some(&g.workspace)}))
        .collect::<Vec<_>>())
}

/// `muster whoami`.
pub async fn whoami(server: &str, output: OutputFormat) -> anyhow::Result<()> {
    let mut c = connect(server).await?;
    let me = c
        .access
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .map_err(status)?
        .into_inner();
    match output {
        OutputFormat::Json => print_json(&json!({
            "principal": me.principal,
            "token_id": me.token_id,
            "token_expires_at": me.token_expires_at_ms.map(|ms| when(Some(ms))),
            "grants": grants_json(&me.grants),
        })),
        OutputFormat::Table => {
            println!(
                "{} (token {}, expires {})",
                me.principal,
                me.token_id,
                when(me.token_expires_at_ms)
            );
            if me.grants.is_empty() {
                println!(
                    "no roles yet: ask an admin for one (`muster role grant USER user --workspace W`)"
                );
            } else {
                println!("{}", grants_table(&me.grants));
            }
        }
    }
    Ok(())
}

fn token_row(t: &v1::TokenInfo) -> Vec<String> {
    let state = if t.revoked_at_ms.is_some() {
        "revoked".to_string()
    } else if let Some(node) = &t.used_by {
        format!("used by {node}")
    } else {
        "active".to_string()
    };
    vec![
        t.id.clone(),
        t.principal.clone(),
        t.name.clone(),
        when(Some(t.created_at_ms)),
        when(t.expires_at_ms),
        state,
    ]
}

fn token_json(t: &v1::TokenInfo) -> serde_json::Value {
    json!({
        "id": t.id,
        "principal": t.principal,
        "name": t.name,
        "created_at": when(Some(t.created_at_ms)),
        "expires_at": t.expires_at_ms.map(|ms| when(Some(ms))),
        "revoked_at": t.revoked_at_ms.map(|ms| when(Some(ms))),
        "created_by": t.created_by,
        "used_by": t.used_by,
    })
}

/// Parses `--expires`: a duration (`30d`, `12h`) or `never`.
fn parse_expires(expires: Option<&str>) -> anyhow::Result<(u64, bool)> {
    match expires.map(str::trim) {
        None => Ok((0, false)),
        Some("never") => Ok((0, true)),
        Some(text) => {
            let d = humantime::parse_duration(text).map_err(|e| {
                anyhow::anyhow!(
                    "--expires {text:?}: {e}; give a duration like 30d or 12h, or never"
                )
            })?;
            anyhow::ensure!(d.as_secs() > 0, "--expires: give at least one second");
            Ok((d.as_secs(), false))
        }
    }
}

/// `muster token …`.
pub async fn token(server: &str, output: OutputFormat, cmd: TokenCommand) -> anyhow::Result<()> {
    let mut c = connect(server).await?;
    match cmd {
        TokenCommand::Create {
            user,
            name,
            expires,
            join,
            compute,
        } => {
            let (expires_in_s, never_expires) = parse_expires(expires.as_deref())?;
            let made = c
                .access
                .create_token(v1::CreateTokenRequest {
                    user: user.unwrap_or_default(),
                    name,
                    expires_in_s,
                    never_expires,
                    join,
                    compute: compute.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let info = made.info.unwrap_or_default();
            match output {
                OutputFormat::Json => {
                    print_json(&json!({"token": made.token, "info": token_json(&info)}))
                }
                OutputFormat::Table => {
                    println!("{}", made.token);
                    eprintln!(
                        "token {} for {}, expires {}; it is shown only this once",
                        info.id,
                        info.principal,
                        when(info.expires_at_ms)
                    );
                    if join {
                        eprintln!(
                            "start the agent with: muster agent --server {server} --join <the token above> --name NODE"
                        );
                    }
                }
            }
        }
        TokenCommand::List { all } => {
            let tokens = c
                .access
                .list_tokens(v1::ListTokensRequest { all })
                .await
                .map_err(status)?
                .into_inner()
                .tokens;
            match output {
                OutputFormat::Json => {
                    print_json(&json!(tokens.iter().map(token_json).collect::<Vec<_>>()))
                }
                OutputFormat::Table => {
                    let mut t = table(&["ID", "FOR", "NAME", "CREATED", "EXPIRES", "STATE"]);
                    for tok in &tokens {
                        t.add_row(token_row(tok));
                    }
                    println!("{t}");
                }
            }
        }
        TokenCommand::Revoke { id } => {
            c.access
                .revoke_token(v1::RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(status)?;
            println!("revoked token {id}");
        }
    }
    Ok(())
}

/// `muster workspace …`.
pub async fn workspace_cmd(
    server: &str,
    output: OutputFormat,
    cmd: WorkspaceCommand,
) -> anyhow::Result<()> {
    let mut c = connect(server).await?;
    match cmd {
        WorkspaceCommand::Create { name } => {
            c.access
                .create_workspace(v1::CreateWorkspaceRequest { name: name.clone() })
                .await
                .map_err(status)?;
            println!("created workspace {name}");
        }
        WorkspaceCommand::Delete { name } => {
            c.access
                .delete_workspace(v1::DeleteWorkspaceRequest { name: name.clone() })
                .await
                .map_err(status)?;
            println!("deleted workspace {name}");
        }
        WorkspaceCommand::Update {
            name,
            serverless_compute,
            no_serverless_compute,
        } => {
            if serverless_compute.is_none() && !no_serverless_compute {
                anyhow::bail!(
                    "nothing to change: give --serverless-compute COMPUTE or --no-serverless-compute"
                );
            }
            let w = c
                .access
                .set_serverless_compute(v1::SetServerlessComputeRequest {
                    workspace: name.clone(),
                    compute: serverless_compute,
                })
                .await
                .map_err(status)?
                .into_inner();
            match w.serverless_compute {
                Some(target) => println!(
                    "workspace {name}: `compute: serverless` jobs run on compute target {target}"
                ),
                None => println!("workspace {name}: `compute: serverless` jobs are refused"),
            }
        }
        WorkspaceCommand::List => {
            let list = c
                .access
                .list_workspaces(v1::ListWorkspacesRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .workspaces;
            match output {
                OutputFormat::Json => {
                    print_json(&json!(list
                    .iter()
                    .map(|w| json!({"name": w.name, "role": w.role, "created_by": w.created_by, "serverless_compute": w.serverless_compute}))
                    .collect::<Vec<_>>()))
                }
                OutputFormat::Table => {
                    let mut t = table(&["WORKSPACE", "YOUR ROLE", "CREATED BY", "SERVERLESS"]);
                    for w in &list {
                        t.add_row(vec![
                            w.name.clone(),
                            w.role.clone(),
                            w.created_by.clone(),
                            w.serverless_compute.clone().unwrap_or_default(),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
    }
    Ok(())
}

/// `muster role …` (the workspace is `--workspace`; without it, cluster-wide).
pub async fn role(server: &str, output: OutputFormat, cmd: RoleCommand) -> anyhow::Result<()> {
    let mut c = connect(server).await?;
    let workspace = crate::workspace().unwrap_or_default().to_string();
    let grant = |user, role| v1::RoleRequest {
        grant: Some(v1::Grant {
            user,
            workspace: workspace.clone(),
            role,
        }),
    };
    let grants = match cmd {
        RoleCommand::Grant { user, role } => {
            c.access
                .grant_role(grant(user, role))
                .await
                .map_err(status)?
                .into_inner()
                .grants
        }
        RoleCommand::Revoke { user, role } => {
            c.access
                .revoke_role(grant(user, role))
                .await
                .map_err(status)?
                .into_inner()
                .grants
        }
        RoleCommand::List { user } => {
            c.access
                .list_grants(v1::ListGrantsRequest {
                    user: user.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner()
                .grants
        }
    };
    match output {
        OutputFormat::Json => print_json(&grants_json(&grants)),
        OutputFormat::Table => println!("{}", grants_table(&grants)),
    }
    Ok(())
}

/// `muster audit`.
pub async fn audit(server: &str, output: OutputFormat, limit: u32) -> anyhow::Result<()> {
    let mut c = connect(server).await?;
    let log = c
        .access
        .list_audit(v1::ListAuditRequest { limit })
        .await
        .map_err(status)?
        .into_inner();
    match output {
        OutputFormat::Json => print_json(&json!({
            "dropped": log.dropped,
            "events": log.events.iter().map(|e| json!({
                "at": when(Some(e.at_ms)), "actor": e.actor, "action": e.action, "detail": e.detail,
            })).collect::<Vec<_>>(),
        })),
        OutputFormat::Table => {
            let mut t = table(&["AT", "ACTOR", "ACTION", "DETAIL"]);
            for e in &log.events {
                t.add_row(vec![
                    when(Some(e.at_ms)),
                    e.actor.clone(),
                    e.action.clone(),
                    e.detail.clone(),
                ]);
            }
            println!("{t}");
            if log.dropped > 0 {
                println!("({} older events are no longer kept)", log.dropped);
            }
        }
    }
    Ok(())
}

/// `muster tls …`.
pub fn tls(cmd: TlsCommand) -> anyhow::Result<()> {
    match cmd {
        TlsCommand::Init {
            dir,
            servers,
            servers_sign_agents,
        } => {
            let servers = servers
                .iter()
                .map(|s| crate::tls::parse_server(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            for holder in crate::tls::init(&dir, &servers, servers_sign_agents)? {
                println!("{}", holder.display());
            }
            eprintln!(
                "CA fingerprint (for muster agent --ca-fingerprint): {}",
                crate::tls::fingerprint(&dir)?
            );
            eprintln!(
                "CA in {}: copy each server-ID directory to its server (muster server --tls-dir DIR), give clients ca.pem (--ca-file), and keep ca.key off the servers",
                dir.display()
            );
        }
        TlsCommand::Rotate { dir, server } => {
            let (id, names) = crate::tls::parse_server(&server)?;
            let holder = crate::tls::rotate(&dir, id, &names)?;
            println!("{}", holder.display());
            eprintln!("server {id} uses the new certificate for new connections within a second");
        }
        TlsCommand::Fingerprint { dir } => println!("{}", crate::tls::fingerprint(&dir)?),
        TlsCommand::Agent { dir, compute, name } => {
            println!(
                "{}",
                crate::tls::issue_agent(&dir, &compute, &name)?.display()
            );
        }
    }
    Ok(())
}
