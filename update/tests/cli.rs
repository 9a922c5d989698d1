//! The `hvnode-bundle` binary end to end: keygen, create, verify, show. Unit tier (temp files).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ROOT_HASH: &str = "4f0b0bd1c1a1d07c3b9d0c1f2e3d4c5b6a79881726354433221100ffeeddccbb";

fn bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hvnode-bundle"))
        .args(args)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn create(d: &Path, key: &Path, out: &Path) -> Output {
    for name in ["root", "verity", "kernel", "initrd"] {
        std::fs::write(d.join(name), name.repeat(100)).unwrap();
    }
    bin(&[
        "create",
        "--key",
        s(key),
        "--version",
        "0.2.0",
        "--root",
        s(&d.join("root")),
        "--verity",
        s(&d.join("verity")),
        "--root-hash",
        ROOT_HASH,
        "--kernel",
        s(&d.join("kernel")),
        "--initrd",
        s(&d.join("initrd")),
        "--out",
        s(out),
    ])
}

#[test]
fn keygen_create_verify_show() {
    let d = Dir(std::env::temp_dir().join(format!("hvnode-bundle-cli-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&d.0);
    std::fs::create_dir_all(&d.0).unwrap();
    let key = d.0.join("release.key");
    let other = d.0.join("other.key");
    let out = d.0.join("b.hvb");

    let o = bin(&["keygen", "--out", s(&key)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(bin(&["keygen", "--out", s(&other)]).status.success());
    let o = bin(&["keygen", "--out", s(&key)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("already exists"), "{}", text(&o));

    let o = create(&d.0, &key, &out);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("created     1700000000"), "{}", text(&o));

    let pubkey = d.0.join("release.key.pub");
    let o = bin(&["verify", "--pubkey", s(&pubkey), s(&out)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("good, signed by"), "{}", text(&o));

    let o = bin(&["verify", "--pubkey", s(&d.0.join("other.key.pub")), s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("any trusted release key"), "{}", text(&o));

    let o = bin(&[
        "verify",
        "--pubkey",
        s(&pubkey),
        "--running-version",
        "0.3.0",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("older than the running 0.3.0"),
        "{}",
        text(&o)
    );

    let o = bin(&["show", s(&out)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("NOT VERIFIED"), "{}", text(&o));
    assert!(text(&o).contains(ROOT_HASH), "{}", text(&o));

    // A key others can read is refused, and a failed create leaves no file behind.
    let loose = d.0.join("loose.key");
    std::fs::write(&loose, [1u8; 32]).unwrap();
    let failed = d.0.join("failed.hvb");
    let o = create(&d.0, &loose, &failed);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("chmod 600"), "{}", text(&o));
    std::fs::remove_file(d.0.join("kernel")).unwrap();
    let o = bin(&[
        "create",
        "--key",
        s(&key),
        "--version",
        "0.2.0",
        "--root",
        s(&d.0.join("root")),
        "--verity",
        s(&d.0.join("verity")),
        "--root-hash",
        ROOT_HASH,
        "--kernel",
        s(&d.0.join("kernel")),
        "--initrd",
        s(&d.0.join("initrd")),
        "--out",
        s(&failed),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("Cannot read"), "{}", text(&o));
    assert!(!failed.exists());
    assert!(!d.0.join("failed.hvb.partial").exists());
}
