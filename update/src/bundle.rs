//! The update bundle: one file that carries a release's root image, its dm-verity hash tree, the
//! kernel and the initrd, signed by the release key.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "HVNBUNDL"
//!      8     4  format version, big-endian (1)
//!     12     4  manifest length N, big-endian (1 ..= 65536)
//!     16    64  ed25519 signature over exactly the N manifest bytes
//!     80     N  manifest (JSON, see [`Manifest`])
//!   80+N        the payload files, back to back, in manifest order; then the end of the file
//! ```
//!
//! A bundle comes from the network and is treated as hostile until proven otherwise.
//! [`BundleReader::open`] reads only the fixed header and the bounded manifest, and checks the
//! signature against the node's trusted keys before it even parses the JSON; only then are
//! payload sizes (bounded per file) believed. [`BundleReader::unpack`] streams each payload into
//! a [`Sink`] while hashing it and stops at the first file whose length or hash is wrong, or at
//! bytes after the last file; the sink is told to throw away what it got.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::to_hex;

/// The first bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"HVNBUNDL";
/// The format this code writes and the newest it reads.
pub const FORMAT: u32 = 1;
/// The largest manifest a reader accepts.
pub const MAX_MANIFEST: u32 = 64 * 1024;
/// Bytes before the manifest: magic, format, manifest length, signature.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 64;

const CHUNK: usize = 256 * 1024;

/// The role of a payload file. A bundle carries each once, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The squashfs root image.
    Root,
    /// Its dm-verity hash tree (with veritysetup's superblock).
    Verity,
    /// The kernel.
    Kernel,
    /// Our initrd (it carries the root hash the kernel checks the root against).
    Initrd,
}

impl Role {
    /// Every role, in bundle order.
    pub const ALL: [Role; 4] = [Role::Root, Role::Verity, Role::Kernel, Role::Initrd];

    /// The name in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Role::Root => "root",
            Role::Verity => "verity",
            Role::Kernel => "kernel",
            Role::Initrd => "initrd",
        }
    }

    /// The largest file of this role a reader believes: far above anything real, far below
    /// what would fill a disk.
    pub fn max_size(self) -> u64 {
        const GIB: u64 = 1 << 30;
        match self {
            Role::Root => 16 * GIB,
            Role::Verity => 2 * GIB,
            Role::Kernel => GIB / 4,
            Role::Initrd => GIB,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One payload file as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub role: Role,
    /// Exact length in bytes.
    pub size: u64,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
}

/// What a bundle says it carries. Signed as the exact bytes that are in the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The bundle format; equals the header's.
    pub format: u32,
    /// The release, `MAJOR.MINOR.PATCH` with an optional `-PRERELEASE`.
    pub version: String,
    /// When the release was built: its `SOURCE_DATE_EPOCH` (seconds since 1970).
    pub created: u64,
    /// The dm-verity root hash of the root image, lowercase hex.
    pub root_hash: String,
    /// The payload files, in [`Role::ALL`] order.
    pub files: Vec<FileEntry>,
}

/// A release version: `MAJOR.MINOR.PATCH[-PRERELEASE]`. A pre-release sorts before its release;
/// two pre-releases of one release sort by their text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
    pub pre: Option<String>,
}

impl Version {
    /// Parses a version, `None` if it is not one.
    pub fn parse(s: &str) -> Option<Version> {
        let (core, pre) = match s.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (s, None),
        };
        if let Some(pre) = pre {
            if pre.is_empty()
                || !pre
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            {
                return None;
            }
        }
        let mut parts = core.split('.');
        let mut num = || -> Option<u64> {
            let p = parts.next()?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 9 {
                return None;
            }
            p.parse().ok()
        };
        let v = Version {
            major: num()?,
            minor: num()?,
            patch: num()?,
            pre: pre.map(str::to_owned),
        };
        parts.next().is_none().then_some(v)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (&self.pre, &other.pre) {
                (None, None) => std::cmp::Ordering::Equal,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(_), None) => std::cmp::Ordering::Less,
                (Some(a), Some(b)) => a.cmp(b),
            })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Why a bundle was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read the bundle")]
    Read(#[source] io::Error),
    #[error("Bundle ends inside the {0}: it is truncated")]
    Truncated(&'static str),
    #[error("Not an hvnode update bundle (wrong magic)")]
    Magic,
    #[error("Bundle format {0} is newer than this node understands ({FORMAT}); update in steps")]
    NewerFormat(u32),
    #[error("Bundle format {0} is not one this node understands")]
    UnknownFormat(u32),
    #[error("Bundle manifest is {0} bytes; the limit is {MAX_MANIFEST}")]
    ManifestSize(u32),
    #[error("Bundle is unsigned")]
    Unsigned,
    #[error("No trusted release keys to check the bundle with")]
    NoTrustedKeys,
    #[error("Bundle signature does not verify with any trusted release key")]
    Untrusted,
    #[error("Bundle manifest is not valid")]
    ManifestJson(#[source] serde_json::Error),
    #[error("Bundle manifest is not valid: {0}")]
    Manifest(String),
    #[error("Bundle header says format {header}, its manifest says {manifest}")]
    FormatMismatch { header: u32, manifest: u32 },
    #[error("Bundle version {bundle} is older than the running {running}; use force to downgrade")]
    Downgrade { bundle: String, running: String },
    #[error("Running version {0:?} is not a version")]
    RunningVersion(String),
    #[error("The {0} file in the bundle does not match its SHA-256 in the manifest")]
    Hash(Role),
    #[error("Bundle has data after its last file")]
    Trailing,
    #[error("Cannot store the {0} file")]
    Sink(&'static str, #[source] io::Error),
    #[error("Cannot read {0}")]
    Input(PathBuf, #[source] io::Error),
    #[error("Cannot write the bundle")]
    Output(#[source] io::Error),
    #[error("No {0} file given")]
    MissingFile(Role),
    #[error("{path} is {size} bytes; a {role} file may be at most {limit}")]
    TooLarge {
        path: PathBuf,
        role: Role,
        size: u64,
        limit: u64,
    },
    #[error("{0} changed while the bundle was written")]
    Changed(PathBuf),
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Manifest {
    /// Checks everything the manifest says that does not need the payload.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Manifest(m));
        if Version::parse(&self.version).is_none() {
            return bad(format!(
                "version {:?} is not MAJOR.MINOR.PATCH",
                self.version
            ));
        }
        if !is_hex64(&self.root_hash) {
            return bad("root_hash is not 64 lowercase hex digits".into());
        }
        let roles: Vec<Role> = self.files.iter().map(|f| f.role).collect();
        if roles != Role::ALL {
            return bad(format!(
                "files must be root, verity, kernel, initrd in this order, not {roles:?}"
            ));
        }
        for f in &self.files {
            if f.size > f.role.max_size() {
                return bad(format!(
                    "the {} file is {} bytes; the limit is {}",
                    f.role,
                    f.size,
                    f.role.max_size()
                ));
            }
            if !is_hex64(&f.sha256) {
                return bad(format!(
                    "the sha256 of {} is not 64 lowercase hex digits",
                    f.role
                ));
            }
        }
        Ok(())
    }

    /// The parsed version (valid once [`validate`](Self::validate) passed).
    pub fn parsed_version(&self) -> Option<Version> {
        Version::parse(&self.version)
    }

    /// The total length of the payload files.
    pub fn payload_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// What a reader accepts.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The release keys the node trusts (from its verified root).
    pub trusted: &'a [VerifyingKey],
    /// The running release: an older bundle is refused unless `force`.
    pub running: Option<&'a str>,
    /// Accept a bundle older than the running release (a deliberate downgrade).
    pub force: bool,
}

/// Where [`BundleReader::unpack`] puts the payload files. Each file gets `begin`, its bytes in
/// order through `write`, and `end` once its length and hash are right; `commit` comes after the
/// last file when the whole bundle checked out, `abort` instead at the first failure (also in the
/// middle of a file). Nothing written before `commit` may be used.
pub trait Sink {
    /// A file starts.
    fn begin(&mut self, file: &FileEntry) -> io::Result<()>;
    /// The next bytes of the current file (not verified yet).
    fn write(&mut self, data: &[u8]) -> io::Result<()>;
    /// The current file is complete and its hash matched.
    fn end(&mut self, file: &FileEntry) -> io::Result<()>;
    /// Every file is complete and the bundle ended where it should: the files may be used.
    fn commit(&mut self) -> io::Result<()>;
    /// The bundle was refused: throw away everything written.
    fn abort(&mut self);
}

/// A sink that keeps nothing: verification only.
#[derive(Debug, Default)]
pub struct NullSink;

impl Sink for NullSink {
    fn begin(&mut self, _: &FileEntry) -> io::Result<()> {
        Ok(())
    }
    fn write(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn end(&mut self, _: &FileEntry) -> io::Result<()> {
        Ok(())
    }
    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn abort(&mut self) {}
}

/// A sink that writes the files into a directory as `root.img`, `root.verity`, `vmlinuz` and
/// `initrd.img`: each first under a `.partial` name, renamed to its own at `commit`, removed at
/// `abort`. The directory never shows a file of a bundle that failed.
#[derive(Debug)]
pub struct DirSink {
    dir: PathBuf,
    current: Option<std::fs::File>,
    partial: Vec<Role>,
}

impl DirSink {
    /// A sink into `dir`, which must exist.
    pub fn new(dir: &Path) -> Self {
        DirSink {
            dir: dir.to_owned(),
            current: None,
            partial: Vec::new(),
        }
    }

    /// The name a file of `role` gets.
    pub fn file_name(role: Role) -> &'static str {
        match role {
            Role::Root => "root.img",
            Role::Verity => "root.verity",
            Role::Kernel => "vmlinuz",
            Role::Initrd => "initrd.img",
        }
    }

    fn partial_path(&self, role: Role) -> PathBuf {
        self.dir.join(format!(".{}.partial", Self::file_name(role)))
    }
}

impl Sink for DirSink {
    fn begin(&mut self, file: &FileEntry) -> io::Result<()> {
        let path = self.partial_path(file.role);
        self.partial.push(file.role);
        self.current = Some(std::fs::File::create(path)?);
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.current {
            Some(f) => f.write_all(data),
            None => Err(io::Error::other("write outside a file")),
        }
    }

    fn end(&mut self, _: &FileEntry) -> io::Result<()> {
        match self.current.take() {
            Some(f) => f.sync_all(),
            None => Err(io::Error::other("end outside a file")),
        }
    }

    fn commit(&mut self) -> io::Result<()> {
        for role in std::mem::take(&mut self.partial) {
            std::fs::rename(
                self.partial_path(role),
                self.dir.join(Self::file_name(role)),
            )?;
        }
        std::fs::File::open(&self.dir)?.sync_all()
    }

    fn abort(&mut self) {
        self.current = None;
        for role in std::mem::take(&mut self.partial) {
            let _ = std::fs::remove_file(self.partial_path(role));
        }
    }
}

/// Reads exactly `buf.len()` bytes; a short read means the bundle ends inside `what`.
fn read_exact(input: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), Error> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Truncated(what),
        _ => Error::Read(e),
    })
}

/// The parts of a bundle before the payload, not verified.
#[derive(Debug, Clone)]
pub struct Header {
    pub format: u32,
    pub signature: [u8; 64],
    pub manifest_bytes: Vec<u8>,
}

impl Header {
    /// Reads and bounds the header and manifest; checks nothing cryptographic.
    pub fn read(input: &mut impl Read) -> Result<Header, Error> {
        let mut fixed = [0u8; HEADER_LEN];
        read_exact(input, &mut fixed[..16], "header")?;
        if fixed[..8] != MAGIC {
            return Err(Error::Magic);
        }
        let word =
            |i: usize| u32::from_be_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]);
        let format = word(8);
        if format > FORMAT {
            return Err(Error::NewerFormat(format));
        }
        if format != FORMAT {
            return Err(Error::UnknownFormat(format));
        }
        let len = word(12);
        if len == 0 || len > MAX_MANIFEST {
            return Err(Error::ManifestSize(len));
        }
        read_exact(input, &mut fixed[16..], "header")?;
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&fixed[16..]);
        let mut manifest_bytes = vec![0u8; len as usize];
        read_exact(input, &mut manifest_bytes, "manifest")?;
        Ok(Header {
            format,
            signature,
            manifest_bytes,
        })
    }

    /// The key among `trusted` whose signature this is.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<VerifyingKey, Error> {
        if trusted.is_empty() {
            return Err(Error::NoTrustedKeys);
        }
        if self.signature == [0u8; 64] {
            return Err(Error::Unsigned);
        }
        let sig = Signature::from_bytes(&self.signature);
        trusted
            .iter()
            .find(|k| k.verify_strict(&self.manifest_bytes, &sig).is_ok())
            .copied()
            .ok_or(Error::Untrusted)
    }

    /// The manifest, parsed and checked for shape (not for its signature).
    pub fn manifest(&self) -> Result<Manifest, Error> {
        let m: Manifest =
            serde_json::from_slice(&self.manifest_bytes).map_err(Error::ManifestJson)?;
        if m.format != self.format {
            return Err(Error::FormatMismatch {
                header: self.format,
                manifest: m.format,
            });
        }
        m.validate()?;
        Ok(m)
    }
}

/// A bundle whose header and manifest were verified, its payload not read yet.
#[derive(Debug)]
pub struct BundleReader<R> {
    input: R,
    manifest: Manifest,
    signer: VerifyingKey,
}

impl<R: Read> BundleReader<R> {
    /// Reads the header and manifest, checks the signature against `policy.trusted`, then the
    /// manifest and the version. Reads no payload byte.
    pub fn open(mut input: R, policy: &Policy<'_>) -> Result<Self, Error> {
        if policy.trusted.is_empty() {
            return Err(Error::NoTrustedKeys);
        }
        let header = Header::read(&mut input)?;
        let signer = header.verify(policy.trusted)?;
        let manifest = header.manifest()?;
        if let (Some(running), false) = (policy.running, policy.force) {
            let current =
                Version::parse(running).ok_or_else(|| Error::RunningVersion(running.to_owned()))?;
            let bundle = manifest.parsed_version();
            if bundle.is_some_and(|b| b < current) {
                return Err(Error::Downgrade {
                    bundle: manifest.version.clone(),
                    running: running.to_owned(),
                });
            }
        }
        Ok(BundleReader {
            input,
            manifest,
            signer,
        })
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The trusted key that signed the bundle.
    pub fn signer(&self) -> &VerifyingKey {
        &self.signer
    }

    /// Streams every payload file into `sink`, checking each file's length and hash and that
    /// nothing follows the last; `sink.commit()` on success, `sink.abort()` at the first error.
    pub fn unpack(mut self, sink: &mut dyn Sink) -> Result<Manifest, Error> {
        match self.unpack_files(sink) {
            Ok(()) => match sink.commit() {
                Ok(()) => Ok(self.manifest),
                Err(e) => {
                    sink.abort();
                    Err(Error::Sink("bundle", e))
                }
            },
            Err(e) => {
                sink.abort();
                Err(e)
            }
        }
    }

    fn unpack_files(&mut self, sink: &mut dyn Sink) -> Result<(), Error> {
        let mut buf = vec![0u8; CHUNK];
        for file in &self.manifest.files {
            let what = file.role.name();
            sink.begin(file).map_err(|e| Error::Sink(what, e))?;
            let mut hasher = Sha256::new();
            let mut left = file.size;
            while left > 0 {
                let want = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
                let n = match self.input.read(&mut buf[..want]) {
                    Ok(0) => return Err(Error::Truncated(what)),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::Read(e)),
                };
                hasher.update(&buf[..n]);
                sink.write(&buf[..n]).map_err(|e| Error::Sink(what, e))?;
                left -= n as u64;
            }
            if to_hex(&hasher.finalize()) != file.sha256 {
                return Err(Error::Hash(file.role));
            }
            sink.end(file).map_err(|e| Error::Sink(what, e))?;
        }
        loop {
            match self.input.read(&mut buf[..1]) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(Error::Trailing),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Read(e)),
            }
        }
    }
}

/// Makes a bundle from a release's files.
#[derive(Debug, Clone)]
pub struct BundleWriter {
    version: String,
    created: u64,
    root_hash: String,
    files: Vec<(Role, PathBuf)>,
}

impl BundleWriter {
    /// A bundle of release `version`, built at `created` (its SOURCE_DATE_EPOCH), whose root
    /// has dm-verity root hash `root_hash` (hex).
    pub fn new(version: &str, created: u64, root_hash: &str) -> Result<Self, Error> {
        if Version::parse(version).is_none() {
            return Err(Error::Manifest(format!(
                "version {version:?} is not MAJOR.MINOR.PATCH"
            )));
        }
        let root_hash = root_hash.to_ascii_lowercase();
        if !is_hex64(&root_hash) {
            return Err(Error::Manifest(
                "root hash is not 64 hex digits (sha256)".into(),
            ));
        }
        Ok(BundleWriter {
            version: version.to_owned(),
            created,
            root_hash,
            files: Vec::new(),
        })
    }

    /// The file for `role`.
    pub fn file(mut self, role: Role, path: &Path) -> Self {
        self.files.retain(|(r, _)| *r != role);
        self.files.push((role, path.to_owned()));
        self
    }

    fn path(&self, role: Role) -> Result<&Path, Error> {
        self.files
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, p)| p.as_path())
            .ok_or(Error::MissingFile(role))
    }

    /// Hashes the files, signs the manifest with `key` and writes the bundle to `out`. The files
    /// are read twice (the manifest with their hashes comes first); a file that changed between
    /// the two reads fails the write.
    pub fn write(&self, key: &SigningKey, out: &mut impl Write) -> Result<Manifest, Error> {
        let mut files = Vec::new();
        for role in Role::ALL {
            let path = self.path(role)?;
            let (size, sha256) = copy_hashing(path, &mut io::sink())?;
            if size > role.max_size() {
                return Err(Error::TooLarge {
                    path: path.to_owned(),
                    role,
                    size,
                    limit: role.max_size(),
                });
            }
            files.push(FileEntry { role, size, sha256 });
        }
        let manifest = Manifest {
            format: FORMAT,
            version: self.version.clone(),
            created: self.created,
            root_hash: self.root_hash.clone(),
            files,
        };
        manifest.validate()?;
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(Error::ManifestJson)?;
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|&l| l <= MAX_MANIFEST)
            .ok_or(Error::ManifestSize(u32::MAX))?;
        let signature = key.sign(&bytes);
        let mut header = Vec::with_capacity(HEADER_LEN + bytes.len());
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&FORMAT.to_be_bytes());
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(&signature.to_bytes());
        header.extend_from_slice(&bytes);
        out.write_all(&header).map_err(Error::Output)?;
        for entry in &manifest.files {
            let path = self.path(entry.role)?;
            let mut counted = WriteErr { out, err: None };
            let result = copy_hashing(path, &mut counted);
            if let Some(e) = counted.err {
                return Err(Error::Output(e));
            }
            let (size, sha256) = result?;
            if size != entry.size || sha256 != entry.sha256 {
                return Err(Error::Changed(path.to_owned()));
            }
        }
        out.flush().map_err(Error::Output)?;
        Ok(manifest)
    }
}

/// Keeps a write error apart from a read error of the input while copying.
struct WriteErr<'a, W> {
    out: &'a mut W,
    err: Option<io::Error>,
}

impl<W: Write> Write for WriteErr<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.out.write_all(data).map_err(|e| {
            let kind = e.kind();
            self.err = Some(e);
            io::Error::from(kind)
        })?;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Copies `path` to `out`, returning its length and SHA-256.
fn copy_hashing(path: &Path, out: &mut impl Write) -> Result<(u64, String), Error> {
    let input_err = |e| Error::Input(path.to_owned(), e);
    let mut f = std::fs::File::open(path).map_err(input_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(input_err(e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(Error::Output)?;
        size += n as u64;
    }
    Ok((size, to_hex(&hasher.finalize())))
}
