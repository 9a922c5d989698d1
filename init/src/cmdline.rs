//! The kernel command line arguments init acts on. Unknown arguments are ignored.

/// What `hvnode.data=` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataArg {
    /// Pick the first suitable blank disk.
    Auto,
    /// Use this whole-disk device (it must be blank).
    Device(String),
}

/// The parsed kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// `hvnode.data=`.
    pub data: Option<DataArg>,
    /// `ip=` (handed to the network crate as is).
    pub ip: Option<String>,
    /// `hvnode.debug`: keep the kernel console verbose.
    pub debug: bool,
    /// `hvnode.root=/dev/..`: the device holding the ISO filesystem (early stage).
    pub root: Option<String>,
}

impl Cmdline {
    /// Reads `/proc/cmdline`; an unreadable command line counts as empty.
    pub fn from_proc() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
    }

    /// Parses a kernel command line. The last occurrence of an argument wins, as in the kernel.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for word in split_words(text) {
            let (key, value) = match word.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (word.as_str(), None),
            };
            match (key, value) {
                ("hvnode.data", Some("auto")) => out.data = Some(DataArg::Auto),
                ("hvnode.data", Some(v)) if v.starts_with("/dev/") && v.len() > 5 => {
                    out.data = Some(DataArg::Device(v.to_owned()));
                }
                ("ip", Some(v)) if !v.is_empty() => out.ip = Some(v.to_owned()),
                ("hvnode.debug", None) => out.debug = true,
                ("hvnode.debug", Some(v)) => out.debug = !matches!(v, "0" | "no" | "off" | "false"),
                ("hvnode.root", Some(v)) if v.starts_with("/dev/") && v.len() > 5 => {
                    out.root = Some(v.to_owned());
                }
                _ => {}
            }
        }
        out
    }
}

/// Splits on whitespace, honouring double quotes as the kernel does (`a="b c"`).
fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_arguments_init_uses_and_ignores_the_rest() {
        let c = Cmdline::parse(
            "BOOT_IMAGE=/boot/vmlinuz console=tty0 console=ttyS0,115200 quiet hvnode.data=auto \
             ip=10.0.0.5::10.0.0.1:255.255.255.0:node:eth0:off hvnode.nested-test=x hvnode.debug\n",
        );
        assert_eq!(c.data, Some(DataArg::Auto));
        assert_eq!(
            c.ip.as_deref(),
            Some("10.0.0.5::10.0.0.1:255.255.255.0:node:eth0:off")
        );
        assert!(c.debug);
        assert_eq!(c.root, None);
    }

    #[test]
    fn data_device_and_root_override() {
        let c = Cmdline::parse("hvnode.data=/dev/sdb hvnode.root=/dev/sr1");
        assert_eq!(c.data, Some(DataArg::Device("/dev/sdb".into())));
        assert_eq!(c.root.as_deref(), Some("/dev/sr1"));
        assert!(!c.debug);
    }

    #[test]
    fn rejects_data_values_that_are_neither_auto_nor_a_device() {
        assert_eq!(Cmdline::parse("hvnode.data=sdb").data, None);
        assert_eq!(Cmdline::parse("hvnode.data=").data, None);
        assert_eq!(Cmdline::parse("hvnode.data=/dev/").data, None);
        assert_eq!(Cmdline::parse("hvnode.root=sr0").root, None);
    }

    #[test]
    fn last_occurrence_wins_and_quotes_group_words() {
        let c = Cmdline::parse("ip=dhcp foo=\"a b\" ip=off hvnode.debug=0");
        assert_eq!(c.ip.as_deref(), Some("off"));
        assert!(!c.debug);
        assert_eq!(
            split_words("x=\"a b\" y"),
            vec!["x=a b".to_owned(), "y".to_owned()]
        );
    }

    #[test]
    fn empty_command_line_gives_defaults() {
        assert_eq!(Cmdline::parse(""), Cmdline::default());
    }
}
