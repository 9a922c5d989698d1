//! Bundles made by `BundleWriter` and refused or accepted by `BundleReader`. Unit tier: files in a
//! temp directory, no root, no network.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use hvnode_update::bundle::{
    BundleReader, BundleWriter, DirSink, Error, FileEntry, Header, Manifest, NullSink, Policy,
    Role, Sink, Version, FORMAT, HEADER_LEN, MAGIC,
};

const ROOT_HASH: &str = "4f0b0bd1c1a1d07c3b9d0c1f2e3d4c5b6a79881726354433221100ffeeddccbb";

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "hvnode-bundle-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// Payload files of the given sizes, each a different byte pattern.
fn files(dir: &Path, sizes: [usize; 4]) -> Vec<(Role, PathBuf)> {
    Role::ALL
        .iter()
        .zip(sizes)
        .enumerate()
        .map(|(i, (&role, size))| {
            let p = dir.join(role.name());
            let data: Vec<u8> = (0..size).map(|j| (j * 7 + i * 31) as u8).collect();
            std::fs::write(&p, data).unwrap();
            (role, p)
        })
        .collect()
}

fn make(dir: &Path, version: &str, sizes: [usize; 4], signer: &SigningKey) -> Vec<u8> {
    let mut w = BundleWriter::new(version, 1_700_000_000, ROOT_HASH).unwrap();
    for (role, p) in files(dir, sizes) {
        w = w.file(role, &p);
    }
    let mut out = Vec::new();
    w.write(signer, &mut out).unwrap();
    out
}

fn small(signer: &SigningKey) -> (TempDir, Vec<u8>) {
    let d = TempDir::new();
    let b = make(&d.0, "1.2.0", [40, 20, 12, 9], signer);
    (d, b)
}

fn policy(keys: &[VerifyingKey]) -> Policy<'_> {
    Policy {
        trusted: keys,
        running: Some("1.1.0"),
        force: false,
    }
}

/// Records what the reader handed over, and whether it committed or aborted.
#[derive(Debug, Default)]
struct Recorder {
    data: Vec<u8>,
    ended: Vec<Role>,
    committed: bool,
    aborted: bool,
}

impl Sink for Recorder {
    fn begin(&mut self, _: &FileEntry) -> io::Result<()> {
        Ok(())
    }
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.data.extend_from_slice(data);
        Ok(())
    }
    fn end(&mut self, f: &FileEntry) -> io::Result<()> {
        self.ended.push(f.role);
        Ok(())
    }
    fn commit(&mut self) -> io::Result<()> {
        self.committed = true;
        Ok(())
    }
    fn abort(&mut self) {
        self.aborted = true;
    }
}

fn unpack(bundle: &[u8], policy: &Policy<'_>) -> Result<(Manifest, Recorder), (Error, Recorder)> {
    let mut rec = Recorder::default();
    let reader = match BundleReader::open(Cursor::new(bundle), policy) {
        Ok(r) => r,
        Err(e) => return Err((e, rec)),
    };
    match reader.unpack(&mut rec) {
        Ok(m) => Ok((m, rec)),
        Err(e) => Err((e, rec)),
    }
}

fn manifest_len(bundle: &[u8]) -> usize {
    u32::from_be_bytes(bundle[12..16].try_into().unwrap()) as usize
}

/// Re-signs a bundle whose manifest was changed, as a holder of `signer` could.
fn resign(bundle: &[u8], manifest: &[u8], payload: &[u8], signer: &SigningKey) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&bundle[..12]);
    b.extend_from_slice(&(manifest.len() as u32).to_be_bytes());
    b.extend_from_slice(&signer.sign(manifest).to_bytes());
    b.extend_from_slice(manifest);
    b.extend_from_slice(payload);
    b
}

#[test]
fn round_trip_hands_over_every_file_and_commits() {
    let k = key(1);
    let d = TempDir::new();
    let bundle = make(&d.0, "1.2.0", [5000, 300, 200, 100], &k);
    let keys = [key(9).verifying_key(), k.verifying_key()];
    let (m, rec) = unpack(&bundle, &policy(&keys)).unwrap();
    assert!(rec.committed && !rec.aborted);
    assert_eq!(rec.ended, Role::ALL);
    let mut expected = Vec::new();
    for role in Role::ALL {
        expected.extend(std::fs::read(d.0.join(role.name())).unwrap());
    }
    assert_eq!(rec.data, expected);
    assert_eq!(m.version, "1.2.0");
    assert_eq!(m.created, 1_700_000_000);
    assert_eq!(m.root_hash, ROOT_HASH);
    assert_eq!(m.format, FORMAT);
    assert_eq!(m.payload_size(), 5600);
    assert_eq!(bundle.len(), HEADER_LEN + manifest_len(&bundle) + 5600);
    assert_eq!(&bundle[..8], &MAGIC);
}

#[test]
fn reader_reports_which_key_signed() {
    let k = key(1);
    let (_d, bundle) = small(&k);
    let keys = [key(9).verifying_key(), k.verifying_key()];
    let r = BundleReader::open(Cursor::new(&bundle), &policy(&keys)).unwrap();
    assert_eq!(r.signer(), &k.verifying_key());
}

#[test]
fn empty_payload_files_round_trip() {
    let k = key(1);
    let d = TempDir::new();
    let bundle = make(&d.0, "1.2.0", [0, 0, 0, 0], &k);
    let keys = [k.verifying_key()];
    let (_, rec) = unpack(&bundle, &policy(&keys)).unwrap();
    assert!(rec.committed);
    assert!(rec.data.is_empty());
}

#[test]
fn dir_sink_shows_files_only_after_a_good_bundle() {
    let k = key(1);
    let (_d, bundle) = small(&k);
    let keys = [k.verifying_key()];
    let out = TempDir::new();
    let names = |dir: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    // A bundle whose last file is cut short leaves nothing behind.
    let mut sink = DirSink::new(&out.0);
    let r = BundleReader::open(Cursor::new(&bundle[..bundle.len() - 1]), &policy(&keys)).unwrap();
    assert!(matches!(
        r.unpack(&mut sink),
        Err(Error::Truncated("initrd"))
    ));
    assert!(names(&out.0).is_empty(), "{:?}", names(&out.0));
    let mut sink = DirSink::new(&out.0);
    let r = BundleReader::open(Cursor::new(&bundle), &policy(&keys)).unwrap();
    r.unpack(&mut sink).unwrap();
    assert_eq!(
        names(&out.0),
        ["initrd.img", "root.img", "root.verity", "vmlinuz"]
    );
    assert_eq!(
        std::fs::read(out.0.join("vmlinuz")).unwrap(),
        std::fs::read(_d.0.join("kernel")).unwrap()
    );
}

#[test]
fn refuses_a_bundle_signed_by_an_untrusted_key() {
    let (_d, bundle) = small(&key(1));
    let keys = [key(2).verifying_key()];
    let (e, rec) = unpack(&bundle, &policy(&keys)).unwrap_err();
    assert!(matches!(e, Error::Untrusted), "{e}");
    assert!(rec.data.is_empty());
}

#[test]
fn refuses_everything_without_trusted_keys() {
    let (_d, bundle) = small(&key(1));
    let (e, _) = unpack(&bundle, &policy(&[])).unwrap_err();
    assert!(matches!(e, Error::NoTrustedKeys), "{e}");
}

#[test]
fn refuses_an_unsigned_bundle() {
    let (_d, mut bundle) = small(&key(1));
    bundle[16..80].fill(0);
    let keys = [key(1).verifying_key()];
    let (e, _) = unpack(&bundle, &policy(&keys)).unwrap_err();
    assert!(matches!(e, Error::Unsigned), "{e}");
}

#[test]
fn refuses_wrong_magic_and_newer_or_unknown_formats() {
    let (_d, bundle) = small(&key(1));
    let keys = [key(1).verifying_key()];
    let mut b = bundle.clone();
    b[0] = b'X';
    assert!(matches!(
        unpack(&b, &policy(&keys)).unwrap_err().0,
        Error::Magic
    ));
    let mut b = bundle.clone();
    b[8..12].copy_from_slice(&2u32.to_be_bytes());
    assert!(matches!(
        unpack(&b, &policy(&keys)).unwrap_err().0,
        Error::NewerFormat(2)
    ));
    let mut b = bundle.clone();
    b[8..12].copy_from_slice(&0u32.to_be_bytes());
    assert!(matches!(
        unpack(&b, &policy(&keys)).unwrap_err().0,
        Error::UnknownFormat(0)
    ));
}

#[test]
fn refuses_absurd_manifest_lengths_before_reading_them() {
    let (_d, bundle) = small(&key(1));
    let keys = [key(1).verifying_key()];
    for len in [0u32, 64 * 1024 + 1, u32::MAX] {
        let mut b = bundle.clone();
        b[12..16].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            unpack(&b, &policy(&keys)).unwrap_err().0,
            Error::ManifestSize(l) if l == len
        ));
    }
}

#[test]
fn refuses_a_bundle_truncated_anywhere() {
    let (_d, bundle) = small(&key(1));
    let keys = [key(1).verifying_key()];
    for len in 0..bundle.len() {
        let (e, rec) = unpack(&bundle[..len], &policy(&keys)).unwrap_err();
        assert!(matches!(e, Error::Truncated(_)), "cut at {len}: {e}");
        assert!(!rec.committed);
        if len < HEADER_LEN + manifest_len(&bundle) {
            assert!(rec.data.is_empty(), "cut at {len}: payload handed over");
        } else {
            assert!(rec.aborted, "cut at {len}: not aborted");
        }
    }
}

#[test]
fn refuses_trailing_bytes() {
    let (_d, mut bundle) = small(&key(1));
    bundle.push(0);
    let keys = [key(1).verifying_key()];
    let (e, rec) = unpack(&bundle, &policy(&keys)).unwrap_err();
    assert!(matches!(e, Error::Trailing), "{e}");
    assert!(rec.aborted && !rec.committed);
    // Every file was whole and checked, but the sink must not use them.
    assert_eq!(rec.ended, Role::ALL);
}

#[test]
fn refuses_a_tampered_payload_naming_the_file_and_stops_there() {
    let (_d, bundle) = small(&key(1));
    let keys = [key(1).verifying_key()];
    let start = HEADER_LEN + manifest_len(&bundle);
    // Second file (verity) starts after the 40-byte root.
    let mut b = bundle.clone();
    b[start + 45] ^= 1;
    let (e, rec) = unpack(&b, &policy(&keys)).unwrap_err();
    assert!(matches!(e, Error::Hash(Role::Verity)), "{e}");
    assert_eq!(rec.ended, [Role::Root]);
    assert_eq!(rec.data.len(), 60, "nothing after the bad file");
    assert!(rec.aborted);
}

#[test]
fn refuses_a_downgrade_unless_forced() {
    let (_d, bundle) = small(&key(1));
    let keys = [key(1).verifying_key()];
    let mut p = policy(&keys);
    p.running = Some("1.10.0");
    let (e, _) = unpack(&bundle, &p).unwrap_err();
    assert!(
        matches!(&e, Error::Downgrade { bundle, running } if bundle == "1.2.0" && running == "1.10.0"),
        "{e}"
    );
    p.force = true;
    unpack(&bundle, &p).unwrap();
    // The same version again is a reinstall, not a downgrade.
    p.force = false;
    p.running = Some("1.2.0");
    unpack(&bundle, &p).unwrap();
    p.running = Some("not a version");
    assert!(matches!(
        unpack(&bundle, &p).unwrap_err().0,
        Error::RunningVersion(_)
    ));
}

#[test]
fn refuses_signed_manifests_that_lie() {
    // Even a trusted signer's manifest is checked: sizes beyond the limits, files missing or out
    // of order, a format that disagrees with the header.
    let k = key(1);
    let (_d, bundle) = small(&k);
    let keys = [k.verifying_key()];
    let start = HEADER_LEN + manifest_len(&bundle);
    let header = Header::read(&mut Cursor::new(&bundle)).unwrap();
    let good = header.manifest().unwrap();
    let payload = &bundle[start..];
    let check = |m: &Manifest| {
        let bytes = serde_json::to_vec(m).unwrap();
        unpack(&resign(&bundle, &bytes, payload, &k), &policy(&keys))
            .unwrap_err()
            .0
    };
    let mut m = good.clone();
    m.files[0].size = 1 << 40;
    assert!(matches!(check(&m), Error::Manifest(_)));
    let mut m = good.clone();
    m.files.swap(0, 1);
    assert!(matches!(check(&m), Error::Manifest(_)));
    let mut m = good.clone();
    m.files.pop();
    assert!(matches!(check(&m), Error::Manifest(_)));
    let mut m = good.clone();
    m.format = 7;
    assert!(matches!(
        check(&m),
        Error::FormatMismatch {
            header: 1,
            manifest: 7
        }
    ));
    let mut m = good.clone();
    m.version = "1.2".into();
    assert!(matches!(check(&m), Error::Manifest(_)));
    let mut m = good.clone();
    m.root_hash = "00".into();
    assert!(matches!(check(&m), Error::Manifest(_)));
    // A size smaller than the file: the rest of the file is trailing data at best.
    let mut m = good.clone();
    m.files[3].size -= 1;
    assert!(matches!(check(&m), Error::Hash(Role::Initrd)));
    let not_json = unpack(&resign(&bundle, b"{", payload, &k), &policy(&keys))
        .unwrap_err()
        .0;
    assert!(matches!(not_json, Error::ManifestJson(_)));
    let unknown = br#"{"format":1,"extra":1}"#;
    let e = unpack(&resign(&bundle, unknown, payload, &k), &policy(&keys))
        .unwrap_err()
        .0;
    assert!(matches!(e, Error::ManifestJson(_)));
}

#[test]
fn every_flipped_byte_is_refused() {
    let k = key(1);
    let (_d, bundle) = small(&k);
    let keys = [k.verifying_key()];
    let payload_start = HEADER_LEN + manifest_len(&bundle);
    for i in 0..bundle.len() {
        for flip in [0x01u8, 0xff] {
            let mut b = bundle.clone();
            b[i] ^= flip;
            let (_, rec) = unpack(&b, &policy(&keys))
                .err()
                .unwrap_or_else(|| panic!("byte {i} ^ {flip:#x} accepted"));
            assert!(!rec.committed, "byte {i}");
            if i < payload_start {
                assert!(
                    rec.data.is_empty(),
                    "byte {i}: payload read before the check"
                );
            }
        }
    }
}

#[test]
fn writer_refuses_missing_files_and_bad_arguments() {
    let d = TempDir::new();
    let f = files(&d.0, [1, 1, 1, 1]);
    let w = BundleWriter::new("1.0.0", 0, ROOT_HASH)
        .unwrap()
        .file(Role::Root, &f[0].1);
    assert!(matches!(
        w.write(&key(1), &mut Vec::new()),
        Err(Error::MissingFile(Role::Verity))
    ));
    let w = BundleWriter::new("1.0.0", 0, ROOT_HASH)
        .unwrap()
        .file(Role::Root, &d.0.join("nope"))
        .file(Role::Verity, &f[1].1)
        .file(Role::Kernel, &f[2].1)
        .file(Role::Initrd, &f[3].1);
    assert!(matches!(
        w.write(&key(1), &mut Vec::new()),
        Err(Error::Input(..))
    ));
    assert!(BundleWriter::new("v1", 0, ROOT_HASH).is_err());
    assert!(BundleWriter::new("1.0.0", 0, "abc").is_err());
    // Upper-case hex is accepted and written in lower case.
    assert!(BundleWriter::new("1.0.0", 0, &ROOT_HASH.to_uppercase()).is_ok());
}

#[test]
fn versions_order_like_releases() {
    let v = |s| Version::parse(s).unwrap();
    assert!(v("1.2.0") < v("1.10.0"));
    assert!(v("1.2.0-rc1") < v("1.2.0"));
    assert!(v("1.2.0-rc1") < v("1.2.0-rc2"));
    assert!(v("2.0.0") > v("1.99.99"));
    assert_eq!(v("0.1.0"), v("0.1.0"));
    for bad in [
        "",
        "1",
        "1.2",
        "1.2.3.4",
        "1.2.x",
        "1.2.3-",
        "1.2.3-a b",
        "-1.2.3",
        "1..3",
    ] {
        assert!(Version::parse(bad).is_none(), "{bad:?}");
    }
}

#[test]
fn verify_only_sink_accepts_a_good_bundle() {
    let k = key(3);
    let (_d, bundle) = small(&k);
    let keys = [k.verifying_key()];
    let r = BundleReader::open(Cursor::new(&bundle), &policy(&keys)).unwrap();
    r.unpack(&mut NullSink).unwrap();
}
