//! SHA-256 certificate fingerprints, `AB:CD:...` (upper-case hex pairs joined by `:`).

use sha2::{Digest, Sha256};

/// Errors of this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FingerprintError {
    /// The text is not 32 hex bytes.
    #[error("Invalid fingerprint {0:?}: expected 32 hex bytes like AB:CD:...:EF")]
    Invalid(String),
}

/// The fingerprint of a DER-encoded certificate.
pub fn of_der(der: &[u8]) -> String {
    format_bytes(&Sha256::digest(der))
}

fn format_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push_str(&format!("{b:02X}"));
    }
    out
}

/// Parses a fingerprint a human typed: any case, with or without `:` separators.
/// Returns the canonical form.
pub fn normalize(text: &str) -> Result<String, FingerprintError> {
    let hex: String = text.trim().chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(FingerprintError::Invalid(text.to_owned()));
    }
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| FingerprintError::Invalid(text.to_owned()))?;
    Ok(format_bytes(&bytes))
}

/// Whether `text` looks like a fingerprint (so a CLI argument can be told from a host name).
pub fn looks_like(text: &str) -> bool {
    normalize(text).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sha256_as_upper_case_colon_separated_pairs() {
        // SHA-256 of the empty string.
        let fp = of_der(b"");
        assert_eq!(
            fp,
            "E3:B0:C4:42:98:FC:1C:14:9A:FB:F4:C8:99:6F:B9:24:27:AE:41:E4:64:9B:93:4C:A4:95:99:1B:78:52:B8:55"
        );
        assert_eq!(fp.len(), 32 * 3 - 1);
    }

    #[test]
    fn normalizes_lower_case_and_unseparated_input() {
        let canonical = of_der(b"abc");
        let plain = canonical.replace(':', "").to_lowercase();
        assert_eq!(normalize(&plain).unwrap(), canonical);
        assert_eq!(normalize(&canonical.to_lowercase()).unwrap(), canonical);
        assert!(looks_like(&canonical));
    }

    #[test]
    fn rejects_short_or_non_hex_fingerprints() {
        assert!(normalize("AB:CD").is_err());
        assert!(normalize(&"ZZ".repeat(32)).is_err());
        assert!(!looks_like("node-1"));
    }
}
