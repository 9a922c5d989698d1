//! SHA-256 certificate fingerprints, `AB:CD:...` (upper-case hex pairs joined by `:`): the form
//! the node's console shows, the manager pins and the docs print.

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

/// The fingerprint in lines of at most `width` columns, broken after a `:` (for narrow screens:
/// the 95 characters do not fit an 80-column console).
pub fn wrapped(fp: &str, width: usize) -> Vec<String> {
    let width = width.max(3);
    let mut lines = vec![String::new()];
    for (i, pair) in fp.split(':').enumerate() {
        let piece = if i == 0 {
            pair.to_owned()
        } else {
            format!(":{pair}")
        };
        let last = lines.last_mut().expect("lines is never empty");
        if !last.is_empty() && last.len() + piece.len() > width {
            lines.push(piece.trim_start_matches(':').to_owned());
        } else {
            last.push_str(&piece);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sha256_as_upper_case_colon_separated_pairs() {
        let fp = of_der(b"abc");
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert!(fp.starts_with("BA:78:16:BF:"));
    }

    #[test]
    fn normalizes_lower_case_and_unseparated_input() {
        let fp = of_der(b"x");
        assert_eq!(normalize(&fp.to_lowercase()).unwrap(), fp);
        assert_eq!(normalize(&fp.replace(':', "")).unwrap(), fp);
    }

    #[test]
    fn rejects_short_or_non_hex_fingerprints() {
        assert!(normalize("AB:CD").is_err());
        assert!(normalize(&"ZZ".repeat(32)).is_err());
        assert!(!looks_like("node1.example"));
    }

    #[test]
    fn wraps_at_pair_boundaries_and_loses_nothing() {
        let fp = of_der(b"abc");
        let lines = wrapped(&fp, 48);
        assert!(lines.iter().all(|l| l.len() <= 48), "{lines:?}");
        assert_eq!(lines.join(":"), fp);
    }
}
