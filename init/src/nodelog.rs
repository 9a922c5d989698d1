//! The node log: init's messages, kernel messages and services' output, timestamped, in one
//! bounded file with one older generation (`node.log.1`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Size at which the log is rotated.
pub const LOG_LIMIT: u64 = 1 << 20;

/// Errors of the node log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log file could not be opened.
    #[error("Cannot open the node log {path}")]
    Open {
        /// The log path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A size-bounded append-only log file.
#[derive(Debug)]
pub struct NodeLog {
    path: PathBuf,
    file: File,
    size: u64,
    limit: u64,
}

impl NodeLog {
    /// Opens (appending) the log at `path`, rotating when it grows past `limit` bytes.
    pub fn open(path: &Path, limit: u64) -> Result<Self, LogError> {
        let file = open_append(path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            limit,
        })
    }

    /// Appends one line (a newline is added), rotating first if the line would not fit.
    pub fn write_line(&mut self, line: &str) {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.limit {
            self.rotate();
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        // A full or failing log must not stop init; the line is still on the consoles.
        if self.file.write_all(&buf).is_ok() {
            self.size += len;
        }
    }

    fn rotate(&mut self) {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        let _ = std::fs::rename(&self.path, &old);
        if let Ok(file) = open_append(&self.path) {
            self.file = file;
            self.size = 0;
        }
    }
}

fn open_append(path: &Path) -> Result<File, LogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LogError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// The current wall-clock time as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn timestamp_now() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format_timestamp(since.as_secs(), since.subsec_millis())
}

/// Formats seconds since the Unix epoch (UTC) with milliseconds.
pub fn format_timestamp(secs: u64, millis: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Converts days since 1970-01-01 into a proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hvnode-init-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn formats_epoch_and_leap_day() {
        assert_eq!(format_timestamp(0, 0), "1970-01-01T00:00:00.000Z");
        // 2024-02-29 12:34:56 UTC
        assert_eq!(
            format_timestamp(1_709_210_096, 7),
            "2024-02-29T12:34:56.007Z"
        );
        assert_eq!(
            format_timestamp(951_782_400, 999),
            "2000-02-29T00:00:00.999Z"
        );
    }

    #[test]
    fn rotates_into_one_older_generation_when_the_limit_is_exceeded() {
        let dir = temp_dir("rotate");
        let path = dir.join("node.log");
        let mut log = NodeLog::open(&path, 100).expect("open");
        for i in 0..5 {
            log.write_line(&format!("first-{i:02}-xxxxxxxxxx"));
        }
        // 5 lines of 20 bytes = 100 bytes: still one file.
        assert!(!dir.join("node.log.1").exists());
        log.write_line("second-00");
        let old = std::fs::read_to_string(dir.join("node.log.1")).expect("old generation");
        let new = std::fs::read_to_string(&path).expect("new log");
        assert_eq!(old.lines().count(), 5);
        assert!(old.starts_with("first-00"));
        assert_eq!(new, "second-00\n");
        for i in 0..20 {
            log.write_line(&format!("third-{i:02}-xxxxxxxxxx"));
        }
        let old = std::fs::read_to_string(dir.join("node.log.1")).expect("old generation");
        assert!(!old.contains("first-"), "only one older generation is kept");
        assert!(std::fs::metadata(&path).expect("log").len() <= 100);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reopening_continues_counting_the_existing_size() {
        let dir = temp_dir("reopen");
        let path = dir.join("node.log");
        std::fs::write(&path, vec![b'a'; 95]).expect("seed");
        let mut log = NodeLog::open(&path, 100).expect("open");
        log.write_line("0123456789");
        assert!(dir.join("node.log.1").exists());
        assert_eq!(std::fs::read_to_string(&path).expect("log"), "0123456789\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
