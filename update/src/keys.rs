//! Release signing keys (ed25519).
//!
//! A private key file holds the raw 32-byte ed25519 seed and nothing else, mode 0600; it lives on
//! the release machine (or its HSM), never on a node. A public key file holds the 32-byte public
//! key as 64 lowercase hex digits and a newline, so it can be read, diffed and pasted. Nodes trust
//! the public keys shipped in their verified root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};

/// Why a key could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read key file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("Cannot write key file {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("Key file {0} already exists; refusing to overwrite a key")]
    Exists(PathBuf),
    #[error("Private key file {0} is {1} bytes; it must be the 32-byte ed25519 seed")]
    PrivateSize(PathBuf, u64),
    #[error("Private key file {0} is readable by group or others; chmod 600 it")]
    PrivateMode(PathBuf),
    #[error("Public key file {0} is not 64 hex digits")]
    PublicFormat(PathBuf),
    #[error("Public key file {0} does not hold a valid ed25519 point")]
    PublicPoint(PathBuf),
    #[error("No randomness from the kernel for a new key: {0}")]
    Random(String),
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The bytes of exactly `N` bytes' worth of hex digits (either case).
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// A new key pair from the kernel's random source.
pub fn generate() -> Result<SigningKey, Error> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| Error::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes `key` to `path` (mode 0600) and its public key to `path.pub`, refusing to overwrite
/// either.
pub fn write_pair(key: &SigningKey, path: &Path) -> Result<PathBuf, Error> {
    let public = public_path(path);
    for p in [path, public.as_path()] {
        if p.symlink_metadata().is_ok() {
            return Err(Error::Exists(p.to_owned()));
        }
    }
    hvnode_base::fs::write_atomic(path, &key.to_bytes(), 0o600)
        .map_err(|e| Error::Write(path.to_owned(), e))?;
    write_public(&key.verifying_key(), &public)?;
    Ok(public)
}

/// `KEY.pub` for `KEY`.
pub fn public_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// Writes a public key file.
pub fn write_public(key: &VerifyingKey, path: &Path) -> Result<(), Error> {
    let text = format!("{}\n", to_hex(key.as_bytes()));
    hvnode_base::fs::write_atomic(path, text.as_bytes(), 0o644)
        .map_err(|e| Error::Write(path.to_owned(), e))
}

/// Reads a private key file, refusing one that others can read.
pub fn read_private(path: &Path) -> Result<SigningKey, Error> {
    let meta = std::fs::metadata(path).map_err(|e| Error::Read(path.to_owned(), e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(Error::PrivateMode(path.to_owned()));
    }
    if meta.len() != 32 {
        return Err(Error::PrivateSize(path.to_owned(), meta.len()));
    }
    let data = std::fs::read(path).map_err(|e| Error::Read(path.to_owned(), e))?;
    let seed: [u8; 32] = data
        .as_slice()
        .try_into()
        .map_err(|_| Error::PrivateSize(path.to_owned(), data.len() as u64))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Parses the text of a public key file.
pub fn parse_public(text: &str, path: &Path) -> Result<VerifyingKey, Error> {
    let bytes = from_hex::<32>(text.trim()).ok_or_else(|| Error::PublicFormat(path.to_owned()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| Error::PublicPoint(path.to_owned()))
}

/// Reads a public key file.
pub fn read_public(path: &Path) -> Result<VerifyingKey, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Read(path.to_owned(), e))?;
    parse_public(&text, path)
}

/// Reads every `*.pub` file in `dir` (the release keys a node trusts), in name order. A malformed
/// file is an error, not skipped: a root that ships one is a broken release.
pub fn read_trusted_dir(dir: &Path) -> Result<Vec<VerifyingKey>, Error> {
    let read_err = |e| Error::Read(dir.to_owned(), e);
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        if path.extension().is_some_and(|e| e == "pub") {
            paths.push(path);
        }
    }
    paths.sort();
    paths.iter().map(|p| read_public(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hvnode-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn hex_round_trips_and_refuses_bad_digits() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(to_hex(&b), "0001abff");
        assert_eq!(from_hex::<4>("0001ABff"), Some(b));
        assert_eq!(from_hex::<4>("0001abf"), None);
        assert_eq!(from_hex::<4>("0001abfg"), None);
        assert_eq!(from_hex::<4>("+001abff"), None);
    }

    #[test]
    fn key_pair_round_trips_through_files_with_private_mode_0600() {
        let d = temp_dir("pair");
        let key = generate().unwrap();
        let path = d.join("release.key");
        let public = write_pair(&key, &path).unwrap();
        assert_eq!(public, d.join("release.key.pub"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_private(&path).unwrap().to_bytes(), key.to_bytes());
        assert_eq!(read_public(&public).unwrap(), key.verifying_key());
        assert!(matches!(write_pair(&key, &path), Err(Error::Exists(_))));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_a_private_key_others_can_read_or_of_the_wrong_size() {
        let d = temp_dir("bad");
        let path = d.join("k");
        hvnode_base::fs::write_atomic(&path, &[7u8; 32], 0o644).unwrap();
        assert!(matches!(read_private(&path), Err(Error::PrivateMode(_))));
        hvnode_base::fs::write_atomic(&path, &[7u8; 33], 0o600).unwrap();
        assert!(matches!(
            read_private(&path),
            Err(Error::PrivateSize(_, 33))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reads_every_public_key_of_a_directory_and_nothing_else() {
        let d = temp_dir("dir");
        let (a, b) = (generate().unwrap(), generate().unwrap());
        write_public(&b.verifying_key(), &d.join("b.pub")).unwrap();
        write_public(&a.verifying_key(), &d.join("a.pub")).unwrap();
        std::fs::write(d.join("README"), "not a key").unwrap();
        assert_eq!(
            read_trusted_dir(&d).unwrap(),
            [a.verifying_key(), b.verifying_key()]
        );
        std::fs::write(d.join("c.pub"), "not a key").unwrap();
        assert!(matches!(read_trusted_dir(&d), Err(Error::PublicFormat(_))));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_malformed_public_keys() {
        let p = Path::new("p");
        assert!(matches!(
            parse_public("abc", p),
            Err(Error::PublicFormat(_))
        ));
        assert!(matches!(
            parse_public(&"zz".repeat(32), p),
            Err(Error::PublicFormat(_))
        ));
        let good = to_hex(generate().unwrap().verifying_key().as_bytes());
        assert!(parse_public(&format!("{good}\n"), p).is_ok());
    }
}
