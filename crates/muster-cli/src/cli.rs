//! The command line, as clap structs. Flags are parsed here; the work is in `commands/`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::paging::PageArgs;

/// muster: run ML training on your own GPU machines.
#[derive(Debug, Parser)]
#[command(name = "muster", version, propagate_version = true)]
pub struct Cli {
    /// The server to talk to (several, comma-separated, are tried in turn).
    #[arg(
        long,
        global = true,
        env = "MUSTER_SERVER",
        default_value = "http://127.0.0.1:7070"
    )]
    pub server: String,
    /// The workspace to work in: new runs, sweeps, pipelines and compute targets go there,
    /// lists show only it (default: new objects in `default`, lists show every workspace
    /// you may read).
    #[arg(long, global = true, env = "MUSTER_WORKSPACE")]
    pub workspace: Option<String>,
    /// The cluster CA's certificate (`ca.pem` of `muster tls init`): talk TLS to the
    /// servers and trust only certificates it signed.
    #[arg(long, global = true, env = "MUSTER_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// How results are printed.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Table for people, JSON for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns.
    Table,
    /// JSON (an array for lists).
    Json,
}

/// Every subcommand: the daemons first, then the client commands (one list in `--help`).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemons, run by the `muster` crate.
    #[command(flatten)]
    Daemon(DaemonCommand),
    /// The client commands, run by [`crate::execute`].
    #[command(flatten)]
    Client(ClientCommand),
}

/// The daemon subcommands: their flags are defined here, and the `muster` crate runs them
/// (it links muster-server and muster-agent; this crate does not).
#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// One process with a server, a local agent and the web UI (for a laptop or a single box).
    Dev(DevArgs),
    /// A coordinator replica.
    Server(Box<ServerArgs>),
    /// The node daemon: runs the runs placed on this machine.
    Agent(Box<AgentArgs>),
}

/// The client subcommands: gRPC clients of the servers of `--server`.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Compute targets: where runs execute.
    #[command(subcommand)]
    Compute(ComputeCommand),
    /// Nodes: the machines running agents.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Runs: submit, follow, inspect, cancel, download.
    #[command(subcommand)]
    Run(RunCommand),
    /// The coordinator cluster: status and membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Pipelines: DAGs of steps, each a run on its own compute target.
    #[command(subcommand)]
    Pipeline(PipelineCommand),
    /// Hyperparameter sweeps: submit, show (trials ranked by the primary metric), cancel.
    #[command(subcommand)]
    Sweep(crate::commands::sweep::SweepCommand),
    /// Data assets: named, versioned files and folders that job inputs name.
    #[command(subcommand)]
    Data(crate::commands::data::DataCommand),
    /// Registered command components that pipeline steps name.
    #[command(subcommand)]
    Component(crate::commands::component::ComponentCommand),
    /// Datastores: folders every node sees, that job inputs name by azureml:// URI.
    #[command(subcommand)]
    Datastore(crate::commands::data::DatastoreCommand),
    /// Workspace secrets: values runs read as files or variables; set, list (names only), delete.
    #[command(subcommand)]
    Secret(crate::commands::secret::SecretCommand),
    /// Log in: check an API token and keep it for `--server` (0600, in the config dir).
    Login(LoginArgs),
    /// Forget the token kept for `--server`.
    Logout,
    /// Who the kept token (or MUSTER_TOKEN) says you are, and your roles.
    Whoami,
    /// API tokens and agents' join tokens: create (shown once), list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Workspaces: a tenant's compute targets, runs, experiments, sweeps and pipelines.
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Roles: reader < user < operator < admin, per workspace or cluster-wide.
    #[command(subcommand)]
    Role(RoleCommand),
    /// The cluster's TLS certificates: a CA, each server's and each agent's certificate.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// The audit log: tokens, joins, grants, revocations and refused requests.
    Audit {
        /// The newest N events.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Make a cluster CA and a certificate for each server (`DIR/server-ID/`).
    Init {
        /// Where to write them (the CA key too: keep it safe).
        #[arg(long)]
        dir: PathBuf,
        /// A server: `ID=HOST[,HOST...]`, the names and addresses it is reached at
        /// (localhost and 127.0.0.1 are added); repeat for each server.
        #[arg(long = "member", value_name = "ID=HOSTS", required = true)]
        servers: Vec<String>,
        /// Give each server the CA key too, so it signs the certificate requests of agents
        /// that join with a join token and `--ca-fingerprint` (a server's compromise is then
        /// the CA's).
        #[arg(long)]
        servers_sign_agents: bool,
    },
    /// Print the CA's fingerprint (`SHA256:…`) for `muster agent --ca-fingerprint`.
    Fingerprint {
        /// The directory of `tls init` (or any holder directory: its `ca.pem`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Re-issue a server's certificate from the CA in DIR; the running server uses it for
    /// new connections within a second.
    Rotate {
        /// The directory of `tls init`.
        #[arg(long)]
        dir: PathBuf,
        /// The server: `ID=HOST[,HOST...]`.
        #[arg(long = "member", value_name = "ID=HOSTS")]
        server: String,
    },
    /// Make an agent's certificate (`DIR/agent-NODE/`) for `muster agent --tls-dir`.
    Agent {
        /// The directory of `tls init`.
        #[arg(long)]
        dir: PathBuf,
        /// The compute target the node joins.
        #[arg(long)]
        compute: String,
        /// The node's name.
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Read the token from this file (default: from standard input, so it stays out of
    /// your shell history and the process list).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; it is printed once and never again.
    Create {
        /// Whose token (default: yours; another user's needs cluster admin).
        #[arg(long)]
        user: Option<String>,
        /// What it is for (shown in `token list`).
        #[arg(long, default_value = "")]
        name: String,
        /// How long it works (`30d`, `12h`; default 90 days, 1 hour for --join), or
        /// `never` (cluster admins only, not for --join).
        #[arg(long)]
        expires: Option<String>,
        /// A single-use join token for `muster agent --join`, for --compute.
        #[arg(long, requires = "compute")]
        join: bool,
        /// The compute target a join token adds a node to.
        #[arg(long)]
        compute: Option<String>,
    },
    /// Your tokens (--all: everyone's, and join tokens; cluster admins).
    List {
        /// Every user's tokens and the join tokens.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a token by its id (the `<id>` of `mst_<id>_…`): it stops working at once.
    Revoke {
        /// The token's id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Make a workspace (cluster admins).
    Create {
        /// Its name.
        name: String,
    },
    /// The workspaces you have a role in.
    List,
    /// Delete an empty workspace and its grants (cluster admins).
    Delete {
        /// Its name.
        name: String,
    },
    /// Change a workspace's settings (its operators).
    Update {
        /// Its name (`default` for the default workspace).
        name: String,
        /// The compute target its `compute: serverless` jobs run on.
        #[arg(long, value_name = "COMPUTE", conflicts_with = "no_serverless_compute")]
        serverless_compute: Option<String>,
        /// Refuse `compute: serverless` jobs from now on.
        #[arg(long)]
        no_serverless_compute: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// Give a user a role in --workspace, or cluster-wide without it.
    Grant {
        /// The user.
        user: String,
        /// reader, user, operator or admin.
        role: String,
    },
    /// Take a role back (in --workspace, or the cluster-wide one).
    Revoke {
        /// The user.
        user: String,
        /// reader, user, operator or admin.
        role: String,
    },
    /// Roles: yours, a user's, or (cluster admins) everyone's.
    List {
        /// Only this user's.
        user: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Submit a `type: pipeline` YAML: snapshot each step's code, upload, queue.
    Submit(PipelineSubmitArgs),
    /// Show a pipeline and its steps (state, run, reused from, compute, reason).
    Show {
        /// The pipeline id.
        id: String,
    },
    /// List pipelines, newest first: the newest 50 (stderr says when there are more).
    List {
        /// Only this experiment.
        #[arg(long)]
        experiment: Option<String>,
        /// Only pipelines in this state (running, canceling, completed, failed, canceled).
        #[arg(long)]
        state: Option<String>,
        /// Only pipelines submitted since: a duration ago (2h, 30m, 7d) or an RFC 3339 time.
        #[arg(long, value_name = "WHEN", value_parser = crate::paging::parse_since)]
        since: Option<u64>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Cancel a pipeline: its running steps are canceled, steps not started fail.
    Cancel {
        /// The pipeline id.
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct PipelineSubmitArgs {
    /// An Azure ML v2 pipeline job YAML (`type: pipeline`).
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Retrying with the same key never creates a second pipeline.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Snapshot limit in bytes (each step's code).
    #[arg(long, default_value_t = 300_000_000)]
    pub max_snapshot_bytes: u64,
    /// Snapshot limit in files (each step's code).
    #[arg(long, default_value_t = 2_000)]
    pub max_snapshot_files: usize,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Members, leader, term, and each member's commit and applied index (and lag).
    Status,
    /// Print a new random cluster key for `muster server --cluster-key-file`.
    Key,
    /// Add a server: it joins as a learner, catches up by snapshot, then votes.
    AddServer {
        /// Its id (unique, never reused).
        #[arg(long)]
        id: u64,
        /// host:port the other servers reach it at.
        #[arg(long)]
        address: String,
    },
    /// Remove a server from the cluster.
    RemoveServer {
        /// Its id.
        #[arg(long)]
        id: u64,
    },
    /// Hand leadership to another server.
    TransferLeader {
        /// The server to lead.
        #[arg(long)]
        to: u64,
    },
    /// Save a consistent backup of the cluster (cluster admins): the replicated state and
    /// every blob, as one tar file. `muster server --restore-from FILE` founds a cluster
    /// from it.
    Backup {
        /// The file to write (written beside it first, then renamed).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Leave the blobs out (code, inputs, outputs, logs): the state alone.
        #[arg(long)]
        no_blobs: bool,
    },
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where everything is kept (default: ~/.local/share/muster/dev).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address for gRPC, the web UI and /metrics.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// The local agent runs at most this many runs at once (default: 4 per CPU).
    #[arg(long)]
    pub max_runs: Option<u32>,
    /// Archive finished runs this long after they ended (`30d`, `12h`): they leave the
    /// replicated state (which every server holds in memory) for archive blobs, and `run
    /// show`, `run logs` and their outputs keep working; `run list` no longer lists them.
    /// Runs of sweeps and pipelines stay. Default: keep every run in the state.
    #[arg(long, value_name = "DURATION", value_parser = parse_retention)]
    pub retention: Option<std::time::Duration>,
    /// How often the leader looks for runs to archive (with --retention).
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_retention, hide = true)]
    pub retention_check: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address for gRPC, the web UI and /metrics.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Found a one-server cluster from a backup (`muster cluster backup`) in an empty
    /// --data-dir: its state (users, tokens, compute targets, runs) and blobs as they
    /// were. Add the other servers with `muster cluster add-server`. Not with --peers or
    /// --join.
    #[arg(long)]
    pub restore_from: Option<PathBuf>,
    /// Where the server keeps its log, snapshots and blobs.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Seconds a node may miss heartbeats before its runs are restarted elsewhere.
    #[arg(long, default_value_t = 30)]
    pub node_grace_secs: u64,
    /// Create the `local` compute target if missing.
    #[arg(long)]
    pub local_compute: bool,
    /// This server's id in the cluster (1, 2, 3, ...).
    #[arg(long, default_value_t = 1)]
    pub id: u64,
    /// The initial members, `ID=HOST:PORT` comma-separated, this server included
    /// (e.g. `1=10.0.0.1:7070,2=10.0.0.2:7070,3=10.0.0.3:7070`). Ignored when the data
    /// directory already holds cluster state. Omit it on a server that joins an existing
    /// cluster with `muster cluster add-server`.
    #[arg(long)]
    pub peers: Option<String>,
    /// Join an existing cluster (wait to be added with `muster cluster add-server`).
    #[arg(long)]
    pub join: bool,
    /// The `HOST:PORT` other servers and agents reach this server at. Default: `--listen`
    /// when it names a specific address (not `0.0.0.0`), or this server's `--peers` entry.
    /// A server started alone needs one before `muster cluster add-server` can grow it.
    #[arg(long)]
    pub advertise: Option<String>,
    /// A file holding the cluster key (`muster cluster key > cluster.key`): servers of one
    /// cluster present it to each other; required with --peers or --join.
    #[arg(long, env = "MUSTER_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// The cluster key itself, from the environment (a container's settings); prefer
    /// --cluster-key-file elsewhere: a flag's value shows in the process list.
    #[arg(
        long,
        env = "MUSTER_CLUSTER_KEY",
        hide_env_values = true,
        conflicts_with = "cluster_key_file"
    )]
    pub cluster_key: Option<String>,
    /// Where the founding server writes the first admin's token (default:
    /// DATA_DIR/admin-token, 0600).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Allow a --listen address other hosts can reach although this server does not
    /// speak TLS: tokens and the cluster key then cross the network in plaintext, so do
    /// this only on a trusted network or behind a TLS-terminating proxy.
    #[arg(long)]
    pub insecure_no_tls: bool,
    /// Speak TLS 1.3 with the files `muster tls init` wrote for this server
    /// (`DIR/{ca,cert,key}.pem`): clients must trust the CA; servers and agents are known
    /// by their certificates.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Uploads (snapshots, outputs) one token may have open at once; one more is refused.
    #[arg(long, default_value_t = 16)]
    pub max_uploads_per_caller: u32,
    /// MiB per second one token's uploads may add up to (faster ones are paced; 0: no limit).
    #[arg(long, default_value_t = 512)]
    pub upload_mib_per_sec: u64,
    /// A host name the web UI is reached at (`NAME`, any port, or `NAME:PORT`), beside
    /// localhost, 127.0.0.1, [::1] and the host of `--advertise`; repeat for more. A
    /// request for any other host name gets 421 (a guard against DNS rebinding).
    #[arg(long = "web-host", value_name = "NAME")]
    pub web_hosts: Vec<String>,
    /// Archive finished runs this long after they ended (`30d`, `12h`): they leave the
    /// replicated state (which every server holds in memory) for archive blobs, and `run
    /// show`, `run logs` and their outputs keep working; `run list` no longer lists them.
    /// Runs of sweeps and pipelines stay. Default: keep every run in the state.
    #[arg(long, value_name = "DURATION", value_parser = parse_retention)]
    pub retention: Option<std::time::Duration>,
    /// How often the leader looks for runs to archive (with --retention).
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_retention, hide = true)]
    pub retention_check: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The compute target this node joins.
    #[arg(long)]
    pub compute: String,
    /// A single-use join token (`muster token create --join --compute C`), needed on the
    /// first start only: the agent trades it for its credential, kept in its data dir.
    #[arg(long, env = "MUSTER_JOIN_TOKEN")]
    pub join: Option<String>,
    /// Talk TLS with the files of `muster tls agent` (`DIR/{ca,cert,key}.pem`): the
    /// certificate says which node this is (no join token needed). With only the global
    /// --ca-file the agent talks TLS and joins with a token.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// With --join: the cluster CA's fingerprint (`muster tls fingerprint`), which the CA a
    /// server presents must match. The agent keeps that CA, sends a certificate request
    /// with its join, and from then on is known by the certificate the servers signed.
    #[arg(long, value_name = "SHA256:HEX")]
    pub ca_fingerprint: Option<String>,
    /// The node's unique name (default: the hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// Where the agent keeps its node id, cache and working directories (default: ~/.local/share/muster/agent).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// dedicated or low_priority.
    #[arg(long, default_value = "dedicated")]
    pub tier: String,
    /// Labels, `key=value`, comma-separated or repeated.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// The address other nodes of a distributed run reach this one at.
    #[arg(long, default_value = "127.0.0.1")]
    pub advertise_addr: String,
    /// Offer at most this many CPUs (e.g. 6 or 5.5); the rest stays for the system.
    #[arg(long)]
    pub cpus: Option<String>,
    /// Offer at most this much memory (e.g. 48g).
    #[arg(long)]
    pub memory: Option<String>,
    /// Run at most this many runs at once on this node, whatever they ask for (default: 4
    /// per CPU it offers, as `muster dev`; runs that ask for no CPU would otherwise all be
    /// placed at once).
    #[arg(long)]
    pub max_runs: Option<u32>,
    /// Where peers of a distributed MPI run reach this agent's exec listener (`addr:port`;
    /// port 0 picks a free port). Fix the port if a firewall sits between nodes.
    #[arg(long, default_value = "0.0.0.0:0")]
    pub exec_listen: String,
    /// The statically linked rsh helper mounted into distributed runs' containers
    /// (default: `muster-rsh` next to the muster binary).
    #[arg(long)]
    pub rsh_helper: Option<PathBuf>,
    /// Seconds an MPI launcher waits for its workers to be up and reachable.
    #[arg(long, default_value_t = 300)]
    pub peer_wait_secs: u64,
    /// Run processes (runs without an image) as this unprivileged user (a name or uid),
    /// each in a working directory private to its attempt, with rlimits. The agent must
    /// run as root.
    #[arg(long, value_name = "USER")]
    pub run_as: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ComputeCommand {
    /// Create a compute target from flags or an Azure ML compute YAML.
    Create(Box<ComputeCreateArgs>),
    /// List compute targets.
    List,
    /// Show one compute target.
    Show {
        /// Its name.
        name: String,
    },
    /// Change a compute target's scaling bounds, idle time, tier, description or quota; the
    /// autoscaler follows at once (its name, type and provisioner stay).
    Update(ComputeUpdateArgs),
    /// Stop a compute instance: its provisioner stops its node once no run holds it, and
    /// its queued runs wait until `compute start`.
    Stop {
        /// The instance.
        name: String,
    },
    /// Start a stopped compute instance: its provisioner starts its node again.
    Start {
        /// The instance.
        name: String,
    },
    /// Stop a compute instance, wait until its node is gone, and start it again.
    Restart {
        /// The instance.
        name: String,
        /// Seconds to wait for the node to stop (its runs finish first).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Delete a compute target with no nodes and no unfinished runs.
    Delete {
        /// Its name.
        name: String,
    },
    /// Attach a machine over SSH: copy this muster there, start its agent as a service
    /// joined to NAME (made an `attached` target if it does not exist), wait until ready.
    Attach(Box<ComputeAttachArgs>),
    /// Detach a node attached over SSH: stop and remove its agent and files there, then
    /// remove the node.
    Detach(Box<ComputeDetachArgs>),
}

/// How `compute attach` and `detach` log in over SSH and check the host key. Passwords
/// and keys are used for the connection only and stored nowhere.
#[derive(Debug, Args)]
pub struct SshLoginArgs {
    /// The private key to log in with (OpenSSH or PEM, without a passphrase).
    #[arg(long, value_name = "FILE", conflicts_with = "password_stdin")]
    pub key: Option<PathBuf>,
    /// Read the login password from standard input (the first line).
    #[arg(long)]
    pub password_stdin: bool,
    /// The known_hosts file the host key is checked against (default ~/.ssh/known_hosts).
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// The host key's fingerprint, as `ssh-keygen -lf` prints it: a host known_hosts does
    /// not know is trusted if its key has it (and refused if not).
    #[arg(long, value_name = "SHA256:...")]
    pub host_key: Option<String>,
}

/// `muster compute attach`.
#[derive(Debug, Args)]
pub struct ComputeAttachArgs {
    /// The compute target (made an `attached` target if it does not exist).
    pub name: Option<String>,
    /// Azure ML's `type: virtualmachine` compute YAML (`name`, `address` (muster's key:
    /// the host), `ssh_settings: {admin_username, ssh_port, ssh_private_key_file}`).
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Where to log in.
    #[arg(long, value_name = "USER@HOST[:PORT]")]
    pub ssh: Option<String>,
    /// Login and host key checking.
    #[command(flatten)]
    pub login: SshLoginArgs,
    /// The node's name (default: the machine's host name).
    #[arg(long)]
    pub node: Option<String>,
    /// The server(s) the agent dials, if the machine reaches them at another address than
    /// --server (URL or HOST:PORT, comma-separated).
    #[arg(long, value_name = "ADDR")]
    pub agent_server: Option<String>,
    /// Seconds to wait for the node to be ready.
    #[arg(long, default_value_t = 120)]
    pub ready_timeout: u64,
}

/// `muster compute detach`.
#[derive(Debug, Args)]
pub struct ComputeDetachArgs {
    /// The compute target.
    pub name: String,
    /// The node to detach.
    #[arg(long)]
    pub node: String,
    /// Where to log in (default: the address it was attached through, its `muster.ssh`
    /// label).
    #[arg(long, value_name = "USER@HOST[:PORT]")]
    pub ssh: Option<String>,
    /// Login and host key checking.
    #[command(flatten)]
    pub login: SshLoginArgs,
    /// Seconds to wait for the agent to stop and the node to go.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct ComputeCreateArgs {
    /// The name (3–24 letters, digits and '-', starting with a letter).
    pub name: Option<String>,
    /// An Azure ML compute YAML (`type: amlcompute`, ...).
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// local, cluster, instance or attached.
    #[arg(long = "type", short = 't')]
    pub kind: Option<String>,
    /// What one node is: an Azure VM size (STANDARD_NC6) or cpu=4,memory=16g,gpus=1. Nodes
    /// carry it as their `size` label; a docker provisioner sizes their containers by it.
    #[arg(long, visible_alias = "vm-size")]
    pub size: Option<String>,
    /// How nodes come and go: static (agents join by hand), docker (agent containers on
    /// the leader's Docker host) or command (your scale-up/scale-down scripts).
    #[arg(long)]
    pub provisioner: Option<String>,
    /// docker: the agent image (default muster:local; its `muster` must be on PATH).
    #[arg(long)]
    pub docker_image: Option<String>,
    /// docker: the agent containers' network mode (default host).
    #[arg(long)]
    pub docker_network: Option<String>,
    /// docker: the servers the agents connect to, HOST:PORT comma-separated (default: the
    /// leader's known addresses).
    #[arg(long, value_delimiter = ',')]
    pub agent_servers: Vec<String>,
    /// docker: labels for the provisioned nodes (and their containers), key=value
    /// comma-separated or repeated.
    #[arg(long, value_delimiter = ',')]
    pub node_labels: Vec<String>,
    /// command: the script that starts nodes (run as SCRIPT COMPUTE SIZE NODE...).
    #[arg(long)]
    pub scale_up: Option<String>,
    /// command: the script that stops nodes (run as SCRIPT COMPUTE SIZE NODE...).
    #[arg(long)]
    pub scale_down: Option<String>,
    /// Scaling, tier, description and quota (as `compute update` takes them).
    #[command(flatten)]
    pub settings: ComputeSettings,
}

/// `muster compute update NAME`: the settings to change (the others stay as they are).
#[derive(Debug, Args)]
pub struct ComputeUpdateArgs {
    /// The compute target.
    pub name: String,
    /// docker: the labels of nodes it provisions from now on (key=value, comma-separated or
    /// repeated; replaces the old set). Nodes already up keep theirs.
    #[arg(long, value_delimiter = ',')]
    pub node_labels: Vec<String>,
    /// What to change.
    #[command(flatten)]
    pub settings: ComputeSettings,
}

/// A compute target's settings that `compute create` and `compute update` both take.
#[derive(Debug, Args)]
pub struct ComputeSettings {
    /// Cluster: the fewest nodes.
    #[arg(long, visible_alias = "min-nodes")]
    pub min_instances: Option<u32>,
    /// Cluster: the most nodes.
    #[arg(long, visible_alias = "max-nodes")]
    pub max_instances: Option<u32>,
    /// Cluster: seconds a node may idle before it is released.
    #[arg(long, visible_alias = "idle-seconds-before-scaledown")]
    pub idle_time_before_scale_down: Option<u64>,
    /// dedicated or low_priority (v1: --vm-priority lowpriority).
    #[arg(long, visible_alias = "vm-priority")]
    pub tier: Option<String>,
    /// Free text.
    #[arg(long)]
    pub description: Option<String>,
    /// Quota: most GPUs the target's active runs hold at once.
    #[arg(long)]
    pub max_gpus: Option<u32>,
    /// Quota: most CPUs the target's active runs reserve at once (`64`, `0.5`, `500m`).
    #[arg(long)]
    pub max_cpus: Option<String>,
    /// Quota: most runs active at once (a gang counts once).
    #[arg(long)]
    pub max_concurrent_runs: Option<u32>,
}

/// `muster node ...`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes by name: the first 50 (stderr says when there are more).
    List {
        /// Only nodes of this compute target.
        #[arg(long)]
        compute: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one node (by name or id).
    Show {
        /// Name or id.
        node: String,
    },
    /// Take no new runs on a node; running ones finish.
    Drain {
        /// Name or id.
        node: String,
    },
    /// Evict a node: its runs restart elsewhere as new attempts (a reclaimed machine).
    Evict {
        /// Name or id.
        node: String,
    },
    /// Let a drained or evicted node take runs again.
    Resume {
        /// Name or id.
        node: String,
    },
    /// Remove a node whose agent is gone (lost, drained or evicted, no active run): its
    /// agent's credential is revoked; `compute delete` of an attached target then works.
    Remove {
        /// Name or id.
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// Submit a run: snapshot the code, upload what the server lacks, queue it.
    Submit(Box<SubmitArgs>),
    /// List runs, newest first: the newest 50 (stderr says when there are more).
    List {
        /// Only this experiment.
        #[arg(long)]
        experiment: Option<String>,
        /// Only runs in this state (queued, running, completed, failed, ...).
        #[arg(long)]
        state: Option<String>,
        /// Only runs on this compute target.
        #[arg(long)]
        compute: Option<String>,
        /// Only runs submitted since: a duration ago (2h, 30m, 7d) or an RFC 3339 time.
        #[arg(long, value_name = "WHEN", value_parser = crate::paging::parse_since)]
        since: Option<u64>,
        #[command(flatten)]
        page: PageArgs,
        /// Answer from this server's replica, without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Show one run.
    Show {
        /// The run id.
        id: String,
        /// Answer from this server's replica, without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Print a run's logs (each attempt in turn). A multi-instance run's ranks are combined,
    /// each line prefixed `[rank N] `; `--rank N` prints one rank's log as it is.
    Logs {
        /// The run id.
        id: String,
        /// Keep following until the run ends.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only this attempt.
        #[arg(long)]
        attempt: Option<u32>,
        /// Only this rank (0-based), unprefixed.
        #[arg(long)]
        rank: Option<u32>,
    },
    /// Print a run's metrics (metric, step, value), as logged to $MUSTER_METRICS_FILE or
    /// as `##muster[metric]` lines on stdout.
    Metrics {
        /// The run id.
        id: String,
        /// Keep printing points as they arrive until the run ends.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only this metric.
        #[arg(long)]
        name: Option<String>,
    },
    /// Cancel a run (SIGTERM, then SIGKILL after the grace period).
    Cancel {
        /// The run id.
        id: String,
    },
    /// Wait for a run to end; exits with its exit code.
    Wait {
        /// The run id.
        id: String,
        /// Give up after this many seconds (exit 75 while the run goes on).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Download a run's outputs/ and logs.
    Download {
        /// The run id.
        id: String,
        /// Where to (default: ./<run id>).
        #[arg(long)]
        to: Option<PathBuf>,
        /// Only this declared output (`outputs/NAME`), and no logs (Azure ML's
        /// `--output-name`).
        #[arg(long, value_name = "NAME")]
        output_name: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// An Azure ML v2 command job YAML.
    #[arg(long, short = 'f', conflicts_with_all = ["runconfig", "run_configuration_name"])]
    pub file: Option<PathBuf>,
    /// An Azure ML v1 run configuration (`.azureml/NAME.runconfig`); the project is the
    /// folder holding `.azureml/`.
    #[arg(long, value_name = "FILE", conflicts_with = "run_configuration_name")]
    pub runconfig: Option<PathBuf>,
    /// The v1 run configuration `.azureml/NAME.runconfig` of the code directory (as
    /// `az ml run submit-script -c NAME`).
    #[arg(long, short = 'c', value_name = "NAME")]
    pub run_configuration_name: Option<String>,
    /// The compute target (default: the job's, else `local`).
    #[arg(long)]
    pub compute: Option<String>,
    /// The experiment (default: the job's, else the code directory's name).
    #[arg(long)]
    pub experiment: Option<String>,
    /// The directory to snapshot (default: the job's `code`, else `.`).
    #[arg(long)]
    pub code: Option<PathBuf>,
    /// Run in this container image.
    #[arg(long)]
    pub image: Option<String>,
    /// Environment variables, `KEY=VALUE` (repeatable).
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// A display name.
    #[arg(long)]
    pub name: Option<String>,
    /// CPUs per instance (`2`, `0.5`, `500m`).
    #[arg(long)]
    pub cpu: Option<String>,
    /// Memory per instance (`8g`, `512m`); in a container it is the hard limit.
    #[arg(long)]
    pub memory: Option<String>,
    /// GPUs per instance.
    #[arg(long)]
    pub gpus: Option<u32>,
    /// Nodes the run spans (all start together or none does).
    #[arg(long)]
    pub instance_count: Option<u32>,
    /// How the instances are wired together: pytorch, mpi or tensorflow.
    #[arg(long)]
    pub distribution: Option<String>,
    /// pytorch / mpi: processes per instance (mpi: the hostfile's slots).
    #[arg(long)]
    pub process_count_per_instance: Option<u32>,
    /// Only nodes with this label take the run, `KEY=VALUE` (repeatable).
    #[arg(long)]
    pub node_selector: Vec<String>,
    /// Seconds before the run is stopped as timed out.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// low, normal, high or an integer.
    #[arg(long)]
    pub priority: Option<String>,
    /// Attempts before the run fails for good (restarts after preemption or node loss).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Upload MUSTER_CHECKPOINT_DIR this often while an attempt runs (`10m`, `1h`), besides
    /// when it ends (YAML `checkpoint.interval`).
    #[arg(long, value_name = "DURATION")]
    pub checkpoint_interval: Option<String>,
    /// Retrying with the same key never creates a second run.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Follow the logs to the end and exit with the run's exit code.
    #[arg(long)]
    pub stream: bool,
    /// Snapshot limit in bytes.
    #[arg(long, default_value_t = 300_000_000)]
    pub max_snapshot_bytes: u64,
    /// Snapshot limit in files.
    #[arg(long, default_value_t = 2_000)]
    pub max_snapshot_files: usize,
    /// The command (after `--`); replaces the job's.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Parses `key=value` labels.
pub fn parse_labels(items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| anyhow::anyhow!("--labels: {s:?} is not key=value"))
        })
        .collect()
}

/// A `--retention` duration (`30d`, `12h`, `90s`): humantime's syntax, more than zero.
pub fn parse_retention(text: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 30d, 12h or 90s ({e})"))?;
    if d.is_zero() {
        return Err("give more than 0 (omit --retention to keep every run)".into());
    }
    Ok(d)
}

#[cfg(test)]
mod consistency {
    #[test]
    fn the_command_line_is_consistent() {
        // clap's own checks (no flag used twice, defaults that parse, ...), for every
        // subcommand: a clash would otherwise panic only when that subcommand runs.
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn retention_takes_a_duration_above_zero() {
        use std::time::Duration;
        assert_eq!(
            super::parse_retention("30d"),
            Ok(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(super::parse_retention(" 90s "), Ok(Duration::from_secs(90)));
        let e = super::parse_retention("0s").unwrap_err();
        assert!(e.contains("omit --retention"), "{e}");
        let e = super::parse_retention("soon").unwrap_err();
        assert!(e.contains("30d, 12h or 90s"), "{e}");
    }
}
