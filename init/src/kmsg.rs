//! Copies the kernel log (`/dev/kmsg`, from its first record) into the node log.

use std::io::Read;

use crate::out;

/// The message of one `/dev/kmsg` record (`PRI,SEQ,USEC,FLAGS;text`), without the
/// continuation lines (`" KEY=value"` dictionary entries).
pub fn parse_record(record: &str) -> Option<&str> {
    let (_, rest) = record.split_once(';')?;
    let text = rest.lines().next().unwrap_or("");
    Some(text.trim_end())
}

/// Reads /dev/kmsg until it fails for good; runs in its own thread.
pub fn reader_loop() {
    let Ok(mut f) = std::fs::File::open("/dev/kmsg") else {
        out::log_only("init: /dev/kmsg is not readable: kernel messages are not in the node log");
        return;
    };
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                if let Some(text) = parse_record(&rec) {
                    out::log_only(&format!("kernel: {text}"));
                }
            }
            // EPIPE: records were overwritten before we read them; go on with the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_the_message_and_drops_dictionary_lines() {
        assert_eq!(
            parse_record("6,339,5140900,-;NET: Registered protocol family 10\n"),
            Some("NET: Registered protocol family 10")
        );
        assert_eq!(
            parse_record("3,1,2,-;usb 1-1: device error\n SUBSYSTEM=usb\n DEVICE=c189:1\n"),
            Some("usb 1-1: device error")
        );
        assert_eq!(parse_record("garbage without separator"), None);
        assert_eq!(parse_record("5,1,2,c;a;b\n"), Some("a;b"));
    }
}
