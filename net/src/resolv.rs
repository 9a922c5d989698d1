//! `resolv.conf` rendering and atomic file writes.

use std::net::IpAddr;
use std::path::Path;

/// glibc reads at most this many `nameserver` lines.
const MAX_NAMESERVERS: usize = 3;
/// glibc reads at most this many search domains.
const MAX_SEARCH: usize = 6;

/// Renders a resolv.conf: search domains, then up to three name servers (duplicates dropped).
pub fn render(dns: &[IpAddr], search: &[String]) -> String {
    let mut out = String::from("# Written by hvnode-net; changes are lost on the next update.\n");
    let mut domains: Vec<&str> = Vec::new();
    for s in search {
        let s = s.trim().trim_end_matches('.');
        if !s.is_empty() && !s.contains(char::is_whitespace) && !domains.contains(&s) {
            domains.push(s);
        }
    }
    if !domains.is_empty() {
        domains.truncate(MAX_SEARCH);
        out.push_str("search ");
        out.push_str(&domains.join(" "));
        out.push('\n');
    }
    let mut seen: Vec<IpAddr> = Vec::new();
    for d in dns {
        if !seen.contains(d) && seen.len() < MAX_NAMESERVERS {
            seen.push(*d);
            out.push_str(&format!("nameserver {d}\n"));
        }
    }
    out
}

/// Writes `contents` to `path` atomically (see [`hvnode_base::fs::write_atomic`]), mode 0644.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    hvnode_base::fs::write_atomic(path, contents, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_search_then_at_most_three_unique_nameservers() {
        let dns: Vec<IpAddr> = [
            "10.0.0.1",
            "10.0.0.1",
            "2001:db8::1",
            "10.0.0.2",
            "10.0.0.3",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let text = render(
            &dns,
            &["lab.example.".into(), "lab.example".into(), "corp".into()],
        );
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            lines,
            vec![
                "search lab.example corp",
                "nameserver 10.0.0.1",
                "nameserver 2001:db8::1",
                "nameserver 10.0.0.2",
            ]
        );
    }

    #[test]
    fn renders_only_the_header_when_empty() {
        assert_eq!(render(&[], &[]).lines().count(), 1);
    }

    #[test]
    fn atomic_write_replaces_file_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("hvnode-net-resolv-{}", std::process::id()));
        let path = dir.join("sub/resolv.conf");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        assert!(!dir.join("sub/resolv.conf.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
