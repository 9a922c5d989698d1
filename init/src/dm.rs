//! Device-mapper through its ioctl interface on `/dev/mapper/control`, and the dm-verity
//! parameters of the root image.
//!
//! The Debian kernel has no DM_INIT (`dm-mod.create=`) and the initrd has no veritysetup, so
//! PID 1 creates the verity device itself: DM_DEV_CREATE, DM_TABLE_LOAD (read-only: the
//! verity target refuses anything else), DM_DEV_SUSPEND without the suspend flag (which
//! resumes, i.e. activates the loaded table). Every request is one buffer: `struct dm_ioctl`,
//! then for a table load each target as a `struct dm_target_spec` followed by its
//! NUL-terminated parameter string, padded so the next spec starts 8-byte aligned.

use std::fs::{File, OpenOptions};
use std::mem::size_of;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The control node devtmpfs creates when dm-mod registers.
pub const CONTROL: &str = "/dev/mapper/control";
const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
const DM_MAX_TYPE_NAME: usize = 16;
/// The interface we speak: major 4 (every kernel since 2.6), nothing from later minors.
const INTERFACE_VERSION: [u32; 3] = [4, 0, 0];
const DM_READONLY_FLAG: u32 = 1 << 0;
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
/// Room for the kernel's answer to DM_TABLE_STATUS (one verity target says one letter).
const STATUS_ROOM: usize = 4096;

/// `struct dm_ioctl` from `<linux/dm-ioctl.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; DM_NAME_LEN],
    uuid: [u8; DM_UUID_LEN],
    data: [u8; 7],
}

/// `struct dm_target_spec` from `<linux/dm-ioctl.h>`; the parameter string follows it.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    next: u32,
    target_type: [u8; DM_MAX_TYPE_NAME],
}

// Both structs are read and written as raw bytes below, which is sound only without padding:
// their sizes are the sums of their fields (and the kernel's sizes).
const _: () = assert!(size_of::<DmIoctl>() == 312);
const _: () = assert!(size_of::<DmIoctl>() == 4 * 10 + 8 + DM_NAME_LEN + DM_UUID_LEN + 7);
const _: () = assert!(size_of::<DmTargetSpec>() == 40);
const _: () = assert!(size_of::<DmTargetSpec>() == 8 + 8 + 4 + 4 + DM_MAX_TYPE_NAME);
const HEADER: usize = size_of::<DmIoctl>();
const SPEC: usize = size_of::<DmTargetSpec>();
const _: () = assert!(HEADER.is_multiple_of(8));

impl DmIoctl {
    fn to_bytes(self) -> [u8; HEADER] {
        // SAFETY: DmIoctl is repr(C) without padding (asserted above), so all of its bytes are
        // initialised; transmute checks at compile time that the sizes agree.
        unsafe { std::mem::transmute::<Self, [u8; HEADER]>(self) }
    }

    fn read_from(buf: &[u8]) -> Option<Self> {
        if buf.len() < HEADER {
            return None;
        }
        // SAFETY: `buf` holds at least HEADER bytes; every bit pattern is a valid DmIoctl
        // (integers and byte arrays only); read_unaligned makes no alignment assumption.
        Some(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<Self>()) })
    }
}

impl DmTargetSpec {
    fn to_bytes(self) -> [u8; SPEC] {
        // SAFETY: DmTargetSpec is repr(C) without padding (asserted above), so all of its
        // bytes are initialised; transmute checks at compile time that the sizes agree.
        unsafe { std::mem::transmute::<Self, [u8; SPEC]>(self) }
    }

    fn read_from(buf: &[u8]) -> Option<Self> {
        if buf.len() < SPEC {
            return None;
        }
        // SAFETY: `buf` holds at least SPEC bytes; every bit pattern is a valid DmTargetSpec;
        // read_unaligned makes no alignment assumption.
        Some(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<Self>()) })
    }
}

/// The device-mapper requests init uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Version = 0,
    DevCreate = 3,
    DevSuspend = 6,
    TableLoad = 9,
    TableStatus = 12,
}

impl Cmd {
    /// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
    fn request(self) -> libc::c_ulong {
        nix::request_code_readwrite!(0xfd, self as u8, HEADER) as libc::c_ulong
    }

    fn name(self) -> &'static str {
        match self {
            Cmd::Version => "DM_VERSION",
            Cmd::DevCreate => "DM_DEV_CREATE",
            Cmd::DevSuspend => "DM_DEV_SUSPEND",
            Cmd::TableLoad => "DM_TABLE_LOAD",
            Cmd::TableStatus => "DM_TABLE_STATUS",
        }
    }
}

/// Errors of device-mapper requests.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    /// The control node did not appear or could not be opened.
    #[error("Cannot open {CONTROL} (is dm-mod loaded?): {0}")]
    Control(std::io::Error),
    /// A request failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// Which request.
        op: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The kernel speaks another major version of the interface.
    #[error("The kernel's device-mapper interface is version {0}, not 4")]
    Version(u32),
    /// A name, target type or parameter string the interface cannot carry.
    #[error("Invalid device-mapper request: {0}")]
    Invalid(&'static str),
    /// The kernel's answer did not parse.
    #[error("{0} returned a malformed answer")]
    Answer(&'static str),
    /// The device node of a new device did not appear.
    #[error("Device node {0} did not appear")]
    NoNode(PathBuf),
}

/// One line of a device-mapper table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector (512 bytes) of the device this target covers.
    pub start: u64,
    /// Sectors covered.
    pub length: u64,
    /// Target type (`verity`, `linear`, ...).
    pub kind: String,
    /// The target's parameter string.
    pub params: String,
}

fn align8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Builds a request: header, then `targets`, then `room` zero bytes for the kernel's answer.
fn encode(name: &str, flags: u32, targets: &[Target], room: usize) -> Result<Vec<u8>, DmError> {
    if name.is_empty() || name.len() >= DM_NAME_LEN || name.contains(['/', '\0']) {
        return Err(DmError::Invalid(
            "device name must be 1-127 bytes without '/'",
        ));
    }
    let mut body = Vec::new();
    for t in targets {
        if t.kind.is_empty() || t.kind.len() >= DM_MAX_TYPE_NAME || t.kind.contains('\0') {
            return Err(DmError::Invalid("target type must be 1-15 bytes"));
        }
        if t.params.contains('\0') {
            return Err(DmError::Invalid("target parameters contain a NUL byte"));
        }
        // The kernel finds each spec from the previous one's `next`, counted from that spec.
        let len = align8(SPEC + t.params.len() + 1);
        let next = u32::try_from(len).map_err(|_| DmError::Invalid("target too long"))?;
        let mut target_type = [0u8; DM_MAX_TYPE_NAME];
        target_type[..t.kind.len()].copy_from_slice(t.kind.as_bytes());
        let spec = DmTargetSpec {
            sector_start: t.start,
            length: t.length,
            status: 0,
            next,
            target_type,
        };
        let at = body.len();
        body.resize(at + len, 0);
        body[at..at + SPEC].copy_from_slice(&spec.to_bytes());
        body[at + SPEC..at + SPEC + t.params.len()].copy_from_slice(t.params.as_bytes());
    }
    let total = HEADER + body.len() + room;
    let mut header = DmIoctl {
        version: INTERFACE_VERSION,
        data_size: u32::try_from(total).map_err(|_| DmError::Invalid("request too long"))?,
        data_start: HEADER as u32,
        target_count: u32::try_from(targets.len())
            .map_err(|_| DmError::Invalid("too many targets"))?,
        open_count: 0,
        flags,
        event_nr: 0,
        padding: 0,
        dev: 0,
        name: [0; DM_NAME_LEN],
        uuid: [0; DM_UUID_LEN],
        data: [0; 7],
    };
    header.name[..name.len()].copy_from_slice(name.as_bytes());
    let mut buf = vec![0u8; total];
    buf[..HEADER].copy_from_slice(&header.to_bytes());
    buf[HEADER..HEADER + body.len()].copy_from_slice(&body);
    Ok(buf)
}

/// The status strings of the targets in a DM_TABLE_STATUS answer, in table order. On
/// output each spec's `next` counts from the first spec (not from the previous one).
fn decode_status(buf: &[u8]) -> Result<Vec<String>, DmError> {
    let bad = || DmError::Answer(Cmd::TableStatus.name());
    let header = DmIoctl::read_from(buf).ok_or_else(bad)?;
    if header.flags & DM_BUFFER_FULL_FLAG != 0 {
        return Err(bad());
    }
    let end = (header.data_size as usize).min(buf.len());
    let first = header.data_start as usize;
    let mut out = Vec::new();
    let mut at = first;
    for _ in 0..header.target_count {
        let spec = buf
            .get(at..end)
            .and_then(DmTargetSpec::read_from)
            .ok_or_else(bad)?;
        let text = &buf[at + SPEC..end];
        let len = text.iter().position(|&b| b == 0).ok_or_else(bad)?;
        out.push(String::from_utf8_lossy(&text[..len]).into_owned());
        at = first + spec.next as usize;
    }
    Ok(out)
}

/// The kernel's `huge_encode_dev` number of a device as (major, minor).
fn split_dev(dev: u64) -> (u64, u64) {
    (nix::sys::stat::major(dev), nix::sys::stat::minor(dev))
}

/// An open `/dev/mapper/control`.
#[derive(Debug)]
pub struct Control {
    file: File,
}

impl Control {
    /// Opens the control node (waiting briefly for devtmpfs) and checks the interface version.
    pub fn open() -> Result<Self, DmError> {
        let mut last = None;
        for _ in 0..50 {
            match OpenOptions::new().read(true).write(true).open(CONTROL) {
                Ok(file) => {
                    let control = Control { file };
                    control.check_version()?;
                    return Ok(control);
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(DmError::Control(last.unwrap_or_else(|| {
            std::io::Error::from_raw_os_error(libc::ENOENT)
        })))
    }

    fn call(&self, cmd: Cmd, buf: &mut [u8]) -> Result<DmIoctl, DmError> {
        // The header's data_size is buf's length (encode), which the kernel trusts.
        debug_assert!(DmIoctl::read_from(buf).is_some_and(|h| h.data_size as usize == buf.len()));
        // SAFETY: `buf` is a request built by `encode`: a dm_ioctl header whose data_size is
        // buf's length, so the kernel reads and writes only within `buf`, which outlives the
        // call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), cmd.request(), buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(DmError::Ioctl {
                op: cmd.name(),
                source: std::io::Error::last_os_error(),
            });
        }
        DmIoctl::read_from(buf).ok_or(DmError::Answer(cmd.name()))
    }

    fn check_version(&self) -> Result<(), DmError> {
        // DM_VERSION names no device; any valid name keeps encode simple.
        let mut buf = encode("-", 0, &[], 0)?;
        let answer = self.call(Cmd::Version, &mut buf)?;
        match answer.version[0] {
            4 => Ok(()),
            other => Err(DmError::Version(other)),
        }
    }

    /// Creates an empty device named `name`.
    pub fn create(&self, name: &str) -> Result<(), DmError> {
        let mut buf = encode(name, 0, &[], 0)?;
        self.call(Cmd::DevCreate, &mut buf).map(drop)
    }

    /// Loads `targets` as the device's inactive table, read-only.
    pub fn load_read_only(&self, name: &str, targets: &[Target]) -> Result<(), DmError> {
        let mut buf = encode(name, DM_READONLY_FLAG, targets, 0)?;
        self.call(Cmd::TableLoad, &mut buf).map(drop)
    }

    /// Makes the loaded table live and returns the device node devtmpfs created for it.
    pub fn resume(&self, name: &str) -> Result<PathBuf, DmError> {
        let mut buf = encode(name, 0, &[], 0)?;
        let answer = self.call(Cmd::DevSuspend, &mut buf)?;
        wait_block_node(answer.dev)
    }

    /// The status line of each target of the device's live table.
    pub fn status(&self, name: &str) -> Result<Vec<String>, DmError> {
        let mut buf = encode(name, 0, &[], STATUS_ROOM)?;
        self.call(Cmd::TableStatus, &mut buf)?;
        decode_status(&buf)
    }
}

/// `/dev/dm-<minor>` once devtmpfs has made it, checked to be the device `dev`.
fn wait_block_node(dev: u64) -> Result<PathBuf, DmError> {
    let (major, minor) = split_dev(dev);
    let path = PathBuf::from(format!("/dev/dm-{minor}"));
    for _ in 0..100 {
        if let Ok(md) = std::fs::metadata(&path) {
            if md.file_type().is_block_device() && split_dev(md.rdev()) == (major, minor) {
                return Ok(path);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(DmError::NoNode(path))
}

/// Errors of the verity parameter file.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// A line is not `key=value`.
    #[error("Line {0} is not key=value")]
    Syntax(usize),
    /// A key this file does not have.
    #[error("Unknown key {0:?}")]
    Unknown(String),
    /// A key is missing.
    #[error("Missing key {0}")]
    Missing(&'static str),
    /// A value is out of range or malformed.
    #[error("Invalid {key}: {value:?}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
    },
}

/// The dm-verity parameters of the root image, as `veritysetup format` made them at build
/// time. They come from the initrd (`/etc/hvnode-root.verity`), never from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityParams {
    /// Hash format (1: the current one, salt before the data).
    pub hash_type: u32,
    /// Bytes per data block.
    pub data_block_size: u32,
    /// Bytes per hash block.
    pub hash_block_size: u32,
    /// Data blocks covered by the tree.
    pub data_blocks: u64,
    /// The hash block where the tree starts (1: after veritysetup's superblock).
    pub hash_start_block: u64,
    /// Hash algorithm (kernel crypto name).
    pub algorithm: String,
    /// Expected root hash, lowercase hex.
    pub root_hash: String,
    /// Salt, lowercase hex, or `-` for none.
    pub salt: String,
}

fn is_hex(s: &str) -> bool {
    !s.is_empty()
        && s.len().is_multiple_of(2)
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl VerityParams {
    /// Parses `key=value` lines (`#` comments and blank lines allowed); every key once.
    pub fn parse(text: &str) -> Result<Self, ParamsError> {
        const KEYS: [&str; 8] = [
            "hash_type",
            "data_block_size",
            "hash_block_size",
            "data_blocks",
            "hash_start_block",
            "hash_algorithm",
            "root_hash",
            "salt",
        ];
        let mut values: [Option<String>; 8] = Default::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or(ParamsError::Syntax(i + 1))?;
            let key = key.trim();
            let slot = KEYS
                .iter()
                .position(|k| *k == key)
                .ok_or_else(|| ParamsError::Unknown(key.to_owned()))?;
            values[slot] = Some(value.trim().to_owned());
        }
        let get = |i: usize| values[i].clone().ok_or(ParamsError::Missing(KEYS[i]));
        let invalid = |i: usize, value: &str| ParamsError::Invalid {
            key: KEYS[i],
            value: value.to_owned(),
        };
        let number = |i: usize| -> Result<u64, ParamsError> {
            let v = get(i)?;
            v.parse::<u64>().map_err(|_| invalid(i, &v))
        };
        // The kernel takes block sizes from 512 bytes up to its page size.
        let block = |i: usize| -> Result<u32, ParamsError> {
            let n = number(i)?;
            if n.is_power_of_two() && (512..=4096).contains(&n) {
                Ok(n as u32)
            } else {
                Err(invalid(i, &n.to_string()))
            }
        };
        let hash_type = number(0)?;
        if hash_type != 1 {
            return Err(invalid(0, &hash_type.to_string()));
        }
        let data_blocks = number(3)?;
        if data_blocks == 0 {
            return Err(invalid(3, "0"));
        }
        let algorithm = get(5)?;
        let digest_hex = match algorithm.as_str() {
            "sha256" => 64,
            "sha512" => 128,
            _ => return Err(invalid(5, &algorithm)),
        };
        let root_hash = get(6)?.to_ascii_lowercase();
        if root_hash.len() != digest_hex || !is_hex(&root_hash) {
            return Err(invalid(6, &root_hash));
        }
        let salt = get(7)?.to_ascii_lowercase();
        // The kernel's limit is 256 bytes of salt.
        if salt != "-" && (!is_hex(&salt) || salt.len() > 512) {
            return Err(invalid(7, &salt));
        }
        Ok(VerityParams {
            hash_type: hash_type as u32,
            data_block_size: block(1)?,
            hash_block_size: block(2)?,
            data_blocks,
            hash_start_block: number(4)?,
            algorithm,
            root_hash,
            salt,
        })
    }

    /// Bytes of the data device the tree covers.
    pub fn data_bytes(&self) -> u64 {
        self.data_blocks
            .saturating_mul(u64::from(self.data_block_size))
    }

    /// The verity table line over `data` and `hash`. No corruption flag: a block that fails
    /// its hash reads as EIO (the kernel's default), so a damaged medium fails the reads it
    /// damages instead of rebooting or panicking the node.
    pub fn target(&self, data: &Path, hash: &Path) -> Target {
        Target {
            start: 0,
            length: self.data_bytes() / 512,
            kind: "verity".to_owned(),
            params: format!(
                "{} {} {} {} {} {} {} {} {} {}",
                self.hash_type,
                data.display(),
                hash.display(),
                self.data_block_size,
                self.hash_block_size,
                self.data_blocks,
                self.hash_start_block,
                self.algorithm,
                self.root_hash,
                self.salt
            ),
        }
    }
}

/// What dm-verity's status line says: `V` verified so far, `C` a block failed its hash.
pub fn verity_corrupted(status: &str) -> bool {
    status.split_whitespace().next() == Some("C")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    const ROOT_HASH: &str = "4d3c5f1e8a0b9c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d";
    const SALT: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn params_text() -> String {
        format!(
            "# written by image/build.sh\nhash_type=1\ndata_block_size=4096\nhash_block_size=4096\n\
             data_blocks=12262\nhash_start_block=1\nhash_algorithm=sha256\nroot_hash={ROOT_HASH}\nsalt={SALT}\n"
        )
    }

    fn u32_at(buf: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(buf: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
    }

    #[test]
    fn header_fields_sit_where_the_kernel_reads_them() {
        assert_eq!(offset_of!(DmIoctl, data_size), 12);
        assert_eq!(offset_of!(DmIoctl, data_start), 16);
        assert_eq!(offset_of!(DmIoctl, target_count), 20);
        assert_eq!(offset_of!(DmIoctl, flags), 28);
        assert_eq!(offset_of!(DmIoctl, dev), 40);
        assert_eq!(offset_of!(DmIoctl, name), 48);
        assert_eq!(offset_of!(DmIoctl, uuid), 176);
        assert_eq!(offset_of!(DmTargetSpec, next), 20);
        assert_eq!(offset_of!(DmTargetSpec, target_type), 24);
    }

    #[test]
    fn request_codes_are_iowr_0xfd_with_the_header_size() {
        assert_eq!(Cmd::Version.request(), 0xc138_fd00);
        assert_eq!(Cmd::DevCreate.request(), 0xc138_fd03);
        assert_eq!(Cmd::DevSuspend.request(), 0xc138_fd06);
        assert_eq!(Cmd::TableLoad.request(), 0xc138_fd09);
        assert_eq!(Cmd::TableStatus.request(), 0xc138_fd0c);
    }

    #[test]
    fn table_load_request_lays_out_header_spec_and_padded_params() {
        let p = VerityParams::parse(&params_text()).expect("parse");
        let t = p.target(Path::new("/dev/loop0"), Path::new("/dev/loop1"));
        let buf =
            encode("hvnode-root", DM_READONLY_FLAG, std::slice::from_ref(&t), 0).expect("encode");
        assert_eq!(buf.len() % 8, 0);
        assert_eq!(u32_at(&buf, 0), 4, "interface major version");
        assert_eq!(
            u32_at(&buf, 12) as usize,
            buf.len(),
            "data_size is the whole buffer"
        );
        assert_eq!(u32_at(&buf, 16) as usize, HEADER, "data_start");
        assert_eq!(u32_at(&buf, 20), 1, "target_count");
        assert_eq!(u32_at(&buf, 28), DM_READONLY_FLAG);
        assert_eq!(&buf[48..60], b"hvnode-root\0");
        let spec = &buf[HEADER..];
        assert_eq!(u64_at(spec, 0), 0, "sector_start");
        assert_eq!(u64_at(spec, 8), 12262 * 8, "length in sectors");
        assert_eq!(
            u32_at(spec, 20) as usize,
            buf.len() - HEADER,
            "next: the end"
        );
        assert_eq!(&spec[24..31], b"verity\0");
        let params = &spec[SPEC..];
        let nul = params.iter().position(|&b| b == 0).expect("NUL");
        assert_eq!(std::str::from_utf8(&params[..nul]).expect("utf8"), t.params);
        assert!(params[nul..].iter().all(|&b| b == 0), "padding is zero");
        assert!(
            params.len() - nul <= 8,
            "padding stops at the next 8-byte boundary"
        );
    }

    #[test]
    fn second_target_starts_where_next_points_8_byte_aligned() {
        let t = |params: &str| Target {
            start: 0,
            length: 8,
            kind: "zero".into(),
            params: params.into(),
        };
        let buf = encode("x", 0, &[t("abc"), t("defghij")], 0).expect("encode");
        let next = u32_at(&buf, HEADER + 20) as usize;
        assert_eq!(next, 48, "40-byte spec + 4 bytes of params rounded up");
        let second = HEADER + next;
        assert_eq!(&buf[second + 24..second + 29], b"zero\0");
        assert_eq!(&buf[second + SPEC..second + SPEC + 8], b"defghij\0");
    }

    #[test]
    fn status_request_leaves_room_for_the_answer() {
        let buf = encode("hvnode-root", 0, &[], STATUS_ROOM).expect("encode");
        assert_eq!(buf.len(), HEADER + STATUS_ROOM);
        assert_eq!(u32_at(&buf, 12) as usize, buf.len());
        assert_eq!(u32_at(&buf, 20), 0);
    }

    #[test]
    fn rejects_names_and_targets_the_interface_cannot_carry() {
        assert!(encode("", 0, &[], 0).is_err());
        assert!(encode(&"n".repeat(128), 0, &[], 0).is_err());
        assert!(encode("a/b", 0, &[], 0).is_err());
        let long_type = Target {
            start: 0,
            length: 1,
            kind: "t".repeat(16),
            params: String::new(),
        };
        assert!(encode("ok", 0, &[long_type], 0).is_err());
        let nul = Target {
            start: 0,
            length: 1,
            kind: "linear".into(),
            params: "a\0b".into(),
        };
        assert!(encode("ok", 0, &[nul], 0).is_err());
    }

    /// An answer as the kernel's retrieve_status writes it: specs from data_start, each
    /// `next` counted from the first spec.
    fn status_answer(lines: &[&str], flags: u32) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER + 256];
        let mut at = HEADER;
        for line in lines {
            let len = align8(SPEC + line.len() + 1);
            let spec = DmTargetSpec {
                sector_start: 0,
                length: 8,
                status: 0,
                next: (at + len - HEADER) as u32,
                target_type: *b"verity\0\0\0\0\0\0\0\0\0\0",
            };
            buf[at..at + SPEC].copy_from_slice(&spec.to_bytes());
            buf[at + SPEC..at + SPEC + line.len()].copy_from_slice(line.as_bytes());
            at += len;
        }
        let mut header =
            DmIoctl::read_from(&encode("hvnode-root", flags, &[], 256).expect("encode"))
                .expect("header");
        header.target_count = lines.len() as u32;
        buf[..HEADER].copy_from_slice(&header.to_bytes());
        buf
    }

    #[test]
    fn decodes_status_lines_of_every_target() {
        let buf = status_answer(&["V", "C extra"], 0);
        assert_eq!(decode_status(&buf).expect("decode"), vec!["V", "C extra"]);
    }

    #[test]
    fn rejects_a_truncated_status_answer() {
        let buf = status_answer(&["V"], DM_BUFFER_FULL_FLAG);
        assert!(decode_status(&buf).is_err());
        let mut unterminated = status_answer(&["V"], 0);
        for b in &mut unterminated[HEADER + SPEC..] {
            *b = b'V';
        }
        assert!(decode_status(&unterminated).is_err());
        assert!(decode_status(&[0u8; 10]).is_err());
    }

    #[test]
    fn verity_status_c_means_a_block_failed_its_hash() {
        assert!(verity_corrupted("C"));
        assert!(!verity_corrupted("V"));
        assert!(!verity_corrupted(""));
    }

    #[test]
    fn parses_the_parameters_build_sh_writes() {
        let p = VerityParams::parse(&params_text()).expect("parse");
        assert_eq!(p.data_blocks, 12262);
        assert_eq!(p.data_bytes(), 12262 * 4096);
        let t = p.target(Path::new("/dev/loop0"), Path::new("/dev/loop1"));
        assert_eq!(t.kind, "verity");
        assert_eq!(t.length, 12262 * 4096 / 512);
        assert_eq!(
            t.params,
            format!("1 /dev/loop0 /dev/loop1 4096 4096 12262 1 sha256 {ROOT_HASH} {SALT}")
        );
    }

    #[test]
    fn rejects_missing_unknown_and_malformed_parameters() {
        let text = params_text();
        let without = |key: &str| {
            text.lines()
                .filter(|l| !l.starts_with(&format!("{key}=")))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert!(matches!(
            VerityParams::parse(&without("root_hash")),
            Err(ParamsError::Missing("root_hash"))
        ));
        assert!(matches!(
            VerityParams::parse(&format!("{text}panic_on_corruption=1\n")),
            Err(ParamsError::Unknown(_))
        ));
        assert!(matches!(
            VerityParams::parse(&format!("{text}garbage\n")),
            Err(ParamsError::Syntax(10))
        ));
        let replace = |from: &str, to: &str| VerityParams::parse(&text.replace(from, to));
        assert!(replace("data_blocks=12262", "data_blocks=0").is_err());
        assert!(replace("data_block_size=4096", "data_block_size=3000").is_err());
        assert!(replace("hash_block_size=4096", "hash_block_size=8192").is_err());
        assert!(replace("hash_type=1", "hash_type=0").is_err());
        assert!(replace("sha256", "md5").is_err());
        assert!(replace(ROOT_HASH, &ROOT_HASH[..62]).is_err());
        assert!(replace(ROOT_HASH, &format!("{} x", &ROOT_HASH[..62])).is_err());
        assert!(replace(SALT, "abc").is_err());
        assert!(replace(SALT, "zz").is_err());
    }

    #[test]
    fn accepts_no_salt_and_uppercase_hex() {
        let p = VerityParams::parse(
            &params_text()
                .replace(SALT, "-")
                .replace(ROOT_HASH, &ROOT_HASH.to_ascii_uppercase()),
        )
        .expect("parse");
        assert_eq!(p.salt, "-");
        assert_eq!(p.root_hash, ROOT_HASH);
    }

    #[test]
    fn splits_the_kernels_device_numbers() {
        // huge_encode_dev(MKDEV(254, 0)) and (254, 300).
        assert_eq!(split_dev(254 << 8), (254, 0));
        assert_eq!(split_dev((254 << 8) | 44 | (256 << 12)), (254, 300));
    }
}
