//! `hvnode-bundle`: makes release keys, and makes, verifies and shows update bundles.
//!
//! Exit codes: 0 done; 1 the bundle was refused or an operation failed; 2 bad usage.

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hvnode_update::bundle::{self, BundleReader, BundleWriter, Header, Manifest, NullSink, Role};
use hvnode_update::keys::{self, to_hex};

#[derive(Parser, Debug)]
#[command(
    name = "hvnode-bundle",
    version,
    about = "hvnode update bundles and release keys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a release key pair: KEY (the raw 32-byte ed25519 seed, mode 0600) and KEY.pub.
    Keygen {
        /// Where to write the private key; the public key goes to the same path plus ".pub".
        #[arg(long)]
        out: PathBuf,
    },
    /// Make a signed bundle from a release's files.
    Create {
        /// The private release key (from keygen).
        #[arg(long)]
        key: PathBuf,
        /// The release version, MAJOR.MINOR.PATCH[-PRERELEASE].
        #[arg(long)]
        version: String,
        /// The squashfs root image.
        #[arg(long)]
        root: PathBuf,
        /// Its dm-verity hash tree.
        #[arg(long)]
        verity: PathBuf,
        /// The dm-verity root hash of the root image (hex).
        #[arg(long)]
        root_hash: String,
        /// The kernel.
        #[arg(long)]
        kernel: PathBuf,
        /// The initrd.
        #[arg(long)]
        initrd: PathBuf,
        /// The bundle to write (through a temp file: a failed run leaves nothing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a bundle completely: signature, manifest, every file's hash.
    Verify {
        /// A trusted public key file; repeat for several.
        #[arg(long = "pubkey", required = true)]
        pubkeys: Vec<PathBuf>,
        /// Refuse a bundle older than this version (as a node does with its own).
        #[arg(long)]
        running_version: Option<String>,
        /// Accept a bundle older than --running-version.
        #[arg(long)]
        force: bool,
        bundle: PathBuf,
    },
    /// Print a bundle's manifest WITHOUT checking its signature or files.
    Show { bundle: PathBuf },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Key(#[from] keys::Error),
    #[error(transparent)]
    Bundle(#[from] bundle::Error),
    #[error("Cannot open {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("SOURCE_DATE_EPOCH is {0:?}, not a number of seconds")]
    Epoch(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hvnode-bundle: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(1)
        }
    }
}

fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Keygen { out } => {
            let key = keys::generate()?;
            let public = keys::write_pair(&key, &out)?;
            println!("private key: {} (keep it off the nodes)", out.display());
            println!("public key:  {}", public.display());
            println!("{}", to_hex(key.verifying_key().as_bytes()));
            Ok(())
        }
        Command::Create {
            key,
            version,
            root,
            verity,
            root_hash,
            kernel,
            initrd,
            out,
        } => {
            let key = keys::read_private(&key)?;
            let writer = BundleWriter::new(&version, created()?, &root_hash)?
                .file(Role::Root, &root)
                .file(Role::Verity, &verity)
                .file(Role::Kernel, &kernel)
                .file(Role::Initrd, &initrd);
            let manifest = write_via_temp(&out, |w| writer.write(&key, w))?;
            println!("wrote {}", out.display());
            print_manifest(&manifest);
            Ok(())
        }
        Command::Verify {
            pubkeys,
            running_version,
            force,
            bundle,
        } => {
            let trusted = pubkeys
                .iter()
                .map(|p| keys::read_public(p))
                .collect::<Result<Vec<_>, _>>()?;
            let file = open(&bundle)?;
            let policy = bundle::Policy {
                trusted: &trusted,
                running: running_version.as_deref(),
                force,
            };
            let reader = BundleReader::open(BufReader::new(file), &policy)?;
            let signer = to_hex(reader.signer().as_bytes());
            let manifest = reader.unpack(&mut NullSink)?;
            println!("{}: good, signed by {signer}", bundle.display());
            print_manifest(&manifest);
            Ok(())
        }
        Command::Show { bundle } => {
            let mut file = BufReader::new(open(&bundle)?);
            let header = Header::read(&mut file)?;
            println!("{}: NOT VERIFIED (use verify)", bundle.display());
            println!("signature   {}", to_hex(&header.signature));
            print_manifest(&header.manifest()?);
            Ok(())
        }
    }
}

fn open(path: &Path) -> Result<std::fs::File, CliError> {
    std::fs::File::open(path).map_err(|e| CliError::Open(path.to_owned(), e))
}

/// The bundle's creation time: SOURCE_DATE_EPOCH when set (reproducible bundles), else now.
fn created() -> Result<u64, CliError> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => s.trim().parse().map_err(|_| CliError::Epoch(s)),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())),
    }
}

/// Writes `out` through a temp file beside it, renamed into place only when `write` succeeded.
fn write_via_temp<T>(
    out: &Path,
    write: impl FnOnce(&mut BufWriter<std::fs::File>) -> Result<T, bundle::Error>,
) -> Result<T, CliError> {
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let file = std::fs::File::create(&tmp).map_err(|e| CliError::Write(tmp.clone(), e))?;
    let mut w = BufWriter::new(file);
    let result = write(&mut w).map_err(CliError::from).and_then(|v| {
        w.flush()
            .and_then(|()| w.get_ref().sync_all())
            .and_then(|()| std::fs::rename(&tmp, out))
            .map_err(|e| CliError::Write(out.to_owned(), e))?;
        Ok(v)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn print_manifest(m: &Manifest) {
    println!("format      {}", m.format);
    println!("version     {}", m.version);
    println!("created     {}", m.created);
    println!("root hash   {}", m.root_hash);
    for f in &m.files {
        println!(
            "{:<11} {:>12} bytes  sha256 {}",
            f.role.name(),
            f.size,
            f.sha256
        );
    }
}
