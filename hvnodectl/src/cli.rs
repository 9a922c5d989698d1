//! Command-line syntax.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The minimal central manager of hvnode nodes, and their test client.
#[derive(Debug, Parser)]
#[command(name = "hvnodectl", version = hvnode_api::VERSION)]
pub struct Cli {
    /// Manager state directory (CA, certificates, nodes.toml, join requests).
    #[arg(long, global = true, env = "HVNODECTL_STATE")]
    pub state_dir: Option<PathBuf>,
    /// Print the raw JSON answers instead of text for humans.
    #[arg(long, global = true)]
    pub json: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the manager: CA, client and server certificates.
    Init {
        /// Manager name, shown on the nodes' consoles.
        #[arg(long)]
        name: String,
        /// Extra DNS name or IP address for the server certificate of `serve`.
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Print the CA fingerprint and the path of its PEM.
    Ca,
    /// Register a node with its pairing code (manager-initiated registration).
    Register {
        /// Name to give the node here.
        node: String,
        /// Node API URL, https://HOST:PORT.
        #[arg(long)]
        url: String,
        /// Pairing code shown on the node's console.
        #[arg(long)]
        code: String,
        /// Expected node certificate fingerprint (from the node's console).
        #[arg(long)]
        fingerprint: Option<String>,
        /// Do not ask for confirmation of the fingerprint.
        #[arg(long)]
        yes: bool,
        /// Replace an existing node of the same name in nodes.toml.
        #[arg(long)]
        replace: bool,
    },
    /// Serve the manager endpoint nodes send join requests to.
    Serve {
        /// Listen address.
        #[arg(long, default_value = "0.0.0.0:9443")]
        listen: SocketAddr,
        /// Extra DNS name or IP address nodes use to reach this manager (added to the
        /// server certificate if missing).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// List join requests.
    Requests,
    /// Approve a join request.
    Approve {
        /// Fingerprint or host name of the requesting node.
        request: String,
        /// Name to give the node here.
        #[arg(long)]
        name: String,
        /// Node API URL (default https://<source ip>:<api port>).
        #[arg(long)]
        url: Option<String>,
    },
    /// Reject a join request.
    Reject {
        /// Fingerprint or host name of the requesting node.
        request: String,
    },
    /// List the registered nodes with their state.
    Nodes,
    /// Unregister a node and forget it.
    Unregister {
        /// Node name.
        node: String,
        /// Forget the node even when it cannot be reached or no longer trusts us.
        #[arg(long)]
        force: bool,
    },
    /// Node commands.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Guest commands.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// Image directory commands.
    #[command(subcommand)]
    Image(ImageCommand),
    /// The cluster: its state in etcd, its members, its guests.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Follow the node's events.
    Events {
        /// Node name.
        node: String,
        /// Start after this sequence number.
        #[arg(long)]
        since: Option<u64>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Wait until a guest reaches a state.
    Wait {
        /// Node name.
        node: String,
        /// Guest name.
        #[arg(long)]
        guest: String,
        /// State to wait for.
        #[arg(long, value_enum)]
        state: WaitState,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

/// `cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Set the cluster up on etcd (it must answer); every registered node joins it.
    Init {
        /// An etcd client URL (http://HOST:PORT); repeat for each member of the etcd cluster.
        #[arg(long = "etcd", required = true)]
        etcd: Vec<String>,
        /// The key prefix of this cluster in etcd.
        #[arg(long, default_value = hvnode_api::cluster::DEFAULT_PREFIX)]
        prefix: String,
        /// The etcd URL the nodes use, when it is not the one this manager uses (NAT, another
        /// network between them); repeat for each member.
        #[arg(long = "node-etcd")]
        node_etcd: Vec<String>,
    },
    /// Have a registered node join the cluster (one registered before `cluster init`), or
    /// join again with another address.
    Join(JoinArgs),
    /// Have a node leave the cluster (it must run no cluster guest).
    Leave(NodeArg),
    /// The cluster as etcd has it: the live members, the leader, the guests and their nodes.
    Status,
    /// Cluster guests: defined in etcd, placed by the cluster's leader on a node with room.
    #[command(subcommand)]
    Guest(ClusterGuestCommand),
    /// Sign a server certificate for etcd with the manager's CA (etcd then admits the manager
    /// and its nodes by their certificates: `--client-cert-auth --trusted-ca-file ca.pem`).
    EtcdCertificate {
        /// A DNS name or IP address clients reach etcd at; repeat for each.
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Where to write server.pem, server.key and ca.pem.
        #[arg(long)]
        out: PathBuf,
    },
    /// Storage domains: NFS exports every node mounts; guests' disks on one are `DOMAIN:path`.
    #[command(subcommand)]
    Domain(DomainCommand),
}

/// `cluster domain ...`.
#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// Define a storage domain: every member mounts it under /run/hvnode/domains/NAME.
    Add {
        /// Its name (lower-case letters, digits, '-', '_').
        name: String,
        /// The NFS server (host name or address).
        #[arg(long)]
        server: String,
        /// The exported path.
        #[arg(long)]
        export: String,
        /// NFS version: 4, 4.1 or 4.2.
        #[arg(long, default_value = "4.2")]
        nfs_version: String,
        /// Extra mount options (e.g. port=20490,timeo=100).
        #[arg(long, default_value = "")]
        options: String,
    },
    /// The storage domains and how each member sees them.
    List,
    /// Remove a storage domain (members unmount it).
    Remove {
        /// Its name.
        name: String,
    },
}

/// `cluster guest ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterGuestCommand {
    /// Define a cluster guest from a TOML file (the format of `guest define`); it is placed and
    /// started unless --stopped.
    Define {
        /// The definition.
        file: PathBuf,
        /// Restart it on another node when its node is lost.
        #[arg(long)]
        ha: bool,
        /// Placement priority: higher first when there is not room for all.
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Define it without starting it.
        #[arg(long)]
        stopped: bool,
    },
    /// List the cluster's guests with their node and state.
    List,
    /// Start a stopped cluster guest, on the node the leader chooses or on --on NODE.
    Start {
        /// Guest name.
        name: String,
        /// Run it on this node (a pin: it stays there until started again without --on).
        #[arg(long)]
        on: Option<String>,
        /// Return without waiting for it to run.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop a cluster guest (its VMM is stopped; it stays defined).
    Stop {
        /// Guest name.
        name: String,
        /// Return without waiting for it to stop.
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a stopped cluster guest.
    Delete {
        /// Guest name.
        name: String,
    },
}

/// States `wait` can wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WaitState {
    /// vCPUs running.
    Running,
    /// No VMM process.
    Stopped,
    /// vCPUs paused.
    Paused,
}

/// `node ...`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Node facts: host name, version, CPUs, memory, NICs, disks.
    Info(NodeArg),
    /// CPU, memory, load, guests.
    Stats(NodeArg),
    /// Change the host name.
    SetHostname {
        /// Node name.
        node: String,
        /// New host name.
        hostname: String,
    },
    /// The node log.
    Logs {
        /// Node name.
        node: String,
        /// Only the last N lines.
        #[arg(long)]
        lines: Option<u32>,
    },
    /// Reboot or power off.
    Power {
        /// Node name.
        node: String,
        /// What to do.
        #[arg(value_enum)]
        action: PowerArg,
    },
    /// Prometheus metrics.
    Metrics(NodeArg),
    /// Sign the node's certificate for node-to-node connections (live migration) with the
    /// manager's CA; `register` does it too. Run it again to renew.
    Certify(NodeArg),
    /// Maintenance mode: on, the node takes no new guests and its cluster guests move to other
    /// nodes one at a time (kept across reboots); follows the drain until the node is drained.
    Maintenance {
        /// Node name.
        node: String,
        /// On or off.
        #[arg(value_enum)]
        mode: OnOff,
        /// A guest that cannot live-migrate: shut it down and start it elsewhere (restart), or
        /// stop the drain there (stop).
        #[arg(long, value_enum, default_value_t = PolicyArg::Restart)]
        policy: PolicyArg,
        /// Return without following the drain.
        #[arg(long)]
        no_wait: bool,
        /// The longest pause each guest may see as it migrates off (default 100 ms).
        #[arg(long = "downtime-ms")]
        downtime_ms: Option<u64>,
    },
    /// The installed system's slots: which runs, which boots next, an update that failed.
    Slots(NodeArg),
    /// Write a signed update bundle (hvnode-bundle create) into the slot the node does not run
    /// from; it boots once at the next boot, and the node falls back if it does not come up.
    Update {
        /// Node name.
        node: String,
        /// The bundle file.
        bundle: std::path::PathBuf,
        /// Accept a bundle older than the running release.
        #[arg(long)]
        force: bool,
        /// Reboot into it once it is written (put the node in maintenance first).
        #[arg(long)]
        reboot: bool,
    },
    /// Boot the other slot next (it must hold a system that was bootable).
    Rollback(NodeArg),
    /// Install the node onto a disk from the live medium it runs from, and follow the writing
    /// until it is done (docs/install.md). Without --disk: list the disks.
    Install {
        /// Node name.
        node: String,
        /// The disk, e.g. /dev/vdb.
        #[arg(long)]
        disk: Option<String>,
        /// The disk's name again: needed when it holds data that is not hvnode's or is the boot
        /// medium (everything on it is erased).
        #[arg(long)]
        confirm: Option<String>,
    },
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// What maintenance mode does with a guest that cannot live-migrate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    /// Shut it down here; the cluster starts it on another node.
    Restart,
    /// Stop the drain at it.
    Stop,
}

/// A node name.
#[derive(Debug, Args)]
pub struct NodeArg {
    /// Node name.
    pub node: String,
}

/// `cluster join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Node name.
    pub node: String,
    /// The URL the other nodes reach this node's agent at (migrations, the fencing peer
    /// check), when it is not the one this manager registered it with (NAT, another network
    /// between the nodes).
    #[arg(long)]
    pub address: Option<String>,
}

/// Power actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PowerArg {
    /// Stop guests and services, reboot.
    Reboot,
    /// Stop guests and services, power off.
    Poweroff,
}

/// A node and a guest.
#[derive(Debug, Args)]
pub struct GuestArg {
    /// Node name.
    pub node: String,
    /// Guest name.
    pub name: String,
}

/// A node, a guest and one of its snapshots.
#[derive(Debug, Args)]
pub struct SnapshotArg {
    /// Node name.
    pub node: String,
    /// Guest name.
    pub name: String,
    /// Snapshot name (lower-case letters, digits, - and _).
    pub snapshot: String,
}

/// A node, a guest, and how long the guest may take to go down.
#[derive(Debug, Args)]
pub struct GuestTimeoutArg {
    /// Node name.
    pub node: String,
    /// Guest name.
    pub name: String,
    /// Stop the guest if it is still up after this many seconds (the node's default: none for
    /// shutdown, 60 for reboot).
    #[arg(long)]
    pub timeout: Option<u64>,
}

/// A node and a guest definition file.
#[derive(Debug, Args)]
pub struct GuestFileArg {
    /// Node name.
    pub node: String,
    /// Guest definition (TOML, `GuestSpec`).
    pub file: PathBuf,
}

/// `guest ...`.
#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// List guests.
    List(NodeArg),
    /// Define a guest from a TOML file.
    Define(GuestFileArg),
    /// Replace the definition of a stopped guest.
    Update(GuestFileArg),
    /// Show one guest.
    Show(GuestArg),
    /// Start a guest.
    Start(GuestArg),
    /// Stop a guest at once.
    Stop(GuestArg),
    /// Ask a guest to shut down (ctrl-alt-del); it is stopped once it goes down.
    Shutdown(GuestTimeoutArg),
    /// Pause a guest's vCPUs.
    Pause(GuestArg),
    /// Resume a paused guest.
    Resume(GuestArg),
    /// Reboot a guest: a shutdown, a stop if it is not down in time, a start.
    Reboot(GuestTimeoutArg),
    /// Delete a stopped guest (and its snapshots).
    Delete(GuestArg),
    /// Snapshot a guest with a VMM: memory, VM state and definition; a running guest is paused
    /// for it and runs on.
    Snapshot(SnapshotArg),
    /// List a guest's snapshots.
    Snapshots(GuestArg),
    /// Start a stopped guest from one of its snapshots: it resumes where it was.
    Restore(SnapshotArg),
    /// Delete one of a guest's snapshots.
    SnapshotDelete(SnapshotArg),
    /// Move a running guest to another node while it runs (live migration), following its
    /// progress; the guest keeps running on the source if anything fails.
    Migrate {
        /// Node the guest runs on.
        node: String,
        /// Guest name.
        name: String,
        /// Node to move it to.
        #[arg(long)]
        to: String,
        /// The URL the source node reaches the destination at, when it is not the one this
        /// manager uses (NAT, another network between the nodes); the destination is still
        /// pinned by its registered certificate.
        #[arg(long)]
        to_url: Option<String>,
        /// Longest pause the guest may see, in milliseconds (default 100).
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// Passes over dirty memory before giving up (default 30).
        #[arg(long)]
        max_passes: Option<u32>,
        /// Seconds before giving up (default 600).
        #[arg(long)]
        timeout: Option<u64>,
        /// Hash all guest memory on both nodes at the switchover and refuse it if they differ.
        #[arg(long)]
        verify_memory: bool,
        /// Start it and return without following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Cancel a guest's migration in progress: it keeps running where it is.
    MigrateCancel(GuestArg),
    /// Print the guest's serial console log, or attach to the console interactively.
    Console {
        /// Node name.
        node: String,
        /// Guest name.
        name: String,
        /// Only the last N bytes.
        #[arg(long, conflicts_with = "attach")]
        bytes: Option<u64>,
        /// Attach interactively (input goes to the guest); Ctrl-] detaches.
        #[arg(long)]
        attach: bool,
    },
}

/// `image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List files in the node's image directory.
    List(NodeArg),
    /// Upload a file into the node's image directory.
    Upload {
        /// Node name.
        node: String,
        /// Local file.
        local_file: PathBuf,
        /// Path below the node's image directory.
        remote_path: String,
    },
    /// Delete a file from the node's image directory.
    Delete {
        /// Node name.
        node: String,
        /// Path below the node's image directory.
        path: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_register_with_global_flags_after_the_command() {
        let cli = Cli::try_parse_from([
            "hvnodectl",
            "register",
            "n1",
            "--url",
            "https://10.0.0.2:8443",
            "--code",
            "123456",
            "--yes",
            "--json",
            "--state-dir",
            "/tmp/s",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.state_dir, Some(PathBuf::from("/tmp/s")));
        match cli.command {
            Command::Register {
                node,
                url,
                code,
                yes,
                fingerprint,
                ..
            } => {
                assert_eq!(
                    (node.as_str(), url.as_str(), code.as_str()),
                    ("n1", "https://10.0.0.2:8443", "123456")
                );
                assert!(yes);
                assert!(fingerprint.is_none());
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn parses_guest_and_wait_commands() {
        let cli = Cli::try_parse_from([
            "hvnodectl",
            "guest",
            "console",
            "n1",
            "web",
            "--bytes",
            "100",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Guest(GuestCommand::Console {
                bytes: Some(100),
                ..
            })
        ));
        let cli = Cli::try_parse_from(["hvnodectl", "guest", "console", "n1", "web", "--attach"])
            .unwrap();
        assert!(matches!(
            cli.command,
            Command::Guest(GuestCommand::Console {
                attach: true,
                bytes: None,
                ..
            })
        ));
        assert!(Cli::try_parse_from([
            "hvnodectl",
            "guest",
            "console",
            "n1",
            "web",
            "--attach",
            "--bytes",
            "10"
        ])
        .is_err());
        let cli = Cli::try_parse_from([
            "hvnodectl",
            "wait",
            "n1",
            "--guest",
            "web",
            "--state",
            "running",
            "--timeout",
            "5",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Wait {
                state: WaitState::Running,
                timeout: 5,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["hvnodectl", "serve"]).unwrap();
        assert!(matches!(cli.command, Command::Serve { listen, .. } if listen.port() == 9443));
    }

    #[test]
    fn parses_maintenance_with_its_policy() {
        let cli = Cli::try_parse_from(["hvnodectl", "node", "maintenance", "n1", "on"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Node(NodeCommand::Maintenance {
                mode: OnOff::On,
                policy: PolicyArg::Restart,
                no_wait: false,
                ..
            })
        ));
        let cli = Cli::try_parse_from([
            "hvnodectl",
            "node",
            "maintenance",
            "n1",
            "off",
            "--policy",
            "stop",
            "--no-wait",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Node(NodeCommand::Maintenance {
                mode: OnOff::Off,
                policy: PolicyArg::Stop,
                no_wait: true,
                ..
            })
        ));
        assert!(Cli::try_parse_from(["hvnodectl", "node", "maintenance", "n1", "maybe"]).is_err());
    }

    #[test]
    fn rejects_unknown_power_action_and_missing_code() {
        assert!(Cli::try_parse_from(["hvnodectl", "node", "power", "n1", "halt"]).is_err());
        assert!(
            Cli::try_parse_from(["hvnodectl", "register", "n1", "--url", "https://x"]).is_err()
        );
    }
}
