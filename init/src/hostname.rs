//! The node's host name: from node.toml, else derived from the first NIC's MAC.

use hvnode_api::config::validate_hostname;

/// Errors of host name handling.
#[derive(Debug, thiserror::Error)]
pub enum HostnameError {
    /// The name is not a valid host name.
    #[error(transparent)]
    Invalid(#[from] hvnode_api::config::ConfigError),
    /// The kernel refused it.
    #[error("Cannot set the host name: {0}")]
    Set(nix::Error),
}

/// `hvnode-` and the last three bytes of the first NIC's MAC (by interface name).
pub fn default_hostname(macs: &[(String, [u8; 6])]) -> String {
    let mut sorted: Vec<&(String, [u8; 6])> = macs.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    match sorted.first() {
        Some((_, m)) => format!("hvnode-{:02x}{:02x}{:02x}", m[3], m[4], m[5]),
        None => "hvnode".to_owned(),
    }
}

/// Validates and sets the kernel host name.
pub fn set(name: &str) -> Result<(), HostnameError> {
    validate_hostname(name)?;
    nix::unistd::sethostname(name).map_err(HostnameError::Set)
}

/// Physical NICs and their MACs from sysfs (interfaces backed by a device).
pub fn sysfs_macs() -> Vec<(String, [u8; 6])> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    for e in dir.flatten() {
        if !e.path().join("device").exists() {
            continue;
        }
        let text = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if let Some(mac) = parse_mac(text.trim()) {
            out.push((e.file_name().to_string_lossy().into_owned(), mac));
        }
    }
    out
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_name_uses_the_first_nic_by_name() {
        let macs = vec![
            ("eth1".to_owned(), [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]),
            ("eth0".to_owned(), [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
        ];
        assert_eq!(default_hostname(&macs), "hvnode-123456");
        assert_eq!(default_hostname(&[]), "hvnode");
    }

    #[test]
    fn parses_macs_and_rejects_malformed_ones() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("zz:54:00:12:34:56"), None);
    }

    #[test]
    fn invalid_names_are_refused_before_the_kernel_sees_them() {
        assert!(matches!(set("bad name!"), Err(HostnameError::Invalid(_))));
    }
}
