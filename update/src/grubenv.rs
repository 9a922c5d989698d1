//! GRUB's environment block (`grub-editenv`, `load_env`, `save_env`): a file of exactly 1024
//! bytes, the line `# GRUB Environment Block`, `name=value` lines, and `#` padding to the end.
//!
//! GRUB rewrites the block in place at boot (`save_env` never changes the file's size or
//! allocation, which is why the size is fixed), so a block we write must keep that shape exactly.
//! In values GRUB escapes `\` and newline with a backslash; a backslash followed by any
//! character stands for that character. Lines starting with `#` are comments (the padding is one).

use std::path::{Path, PathBuf};

/// The size GRUB gives every environment block and refuses to change.
pub const BLOCK_SIZE: usize = 1024;
/// The first line of every block.
pub const HEADER: &str = "# GRUB Environment Block\n";

/// Why a block could not be read, changed or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Environment block is {0} bytes; GRUB's are exactly 1024")]
    Size(usize),
    #[error("Environment block lacks the \"# GRUB Environment Block\" header")]
    Header,
    #[error("Environment block line {0} is not name=value")]
    Line(usize),
    #[error("Environment block line {0} ends in a lone backslash")]
    Escape(usize),
    #[error("Environment block is not UTF-8")]
    Utf8,
    #[error("Invalid variable name {0:?}: use letters, digits and '_'")]
    Name(String),
    #[error("Variables need {needed} bytes; the block has room for {room}")]
    Full { needed: usize, room: usize },
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// The variables of one block, in the order they appear in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrubEnv {
    vars: Vec<(String, String)>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn escape(value: &str, out: &mut String) {
    for c in value.chars() {
        if c == '\\' || c == '\n' {
            out.push('\\');
        }
        out.push(c);
    }
}

impl GrubEnv {
    /// An empty environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a block as GRUB does, refusing what GRUB would not have written.
    pub fn parse(block: &[u8]) -> Result<Self, Error> {
        if block.len() != BLOCK_SIZE {
            return Err(Error::Size(block.len()));
        }
        let body = block.strip_prefix(HEADER.as_bytes()).ok_or(Error::Header)?;
        let body = std::str::from_utf8(body).map_err(|_| Error::Utf8)?;
        let mut env = GrubEnv::new();
        let mut rest = body;
        // Line numbers count the header as line 1.
        let mut line = 1;
        while !rest.is_empty() {
            line += 1;
            if rest.starts_with('#') {
                // A comment or the padding: up to the next newline, or to the end.
                rest = rest.find('\n').map_or("", |i| &rest[i + 1..]);
                continue;
            }
            let eq = rest.find('=').ok_or(Error::Line(line))?;
            let name = &rest[..eq];
            if !valid_name(name) {
                return Err(Error::Line(line));
            }
            let mut value = String::new();
            let mut chars = rest[eq + 1..].char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, escaped)) => {
                            if escaped == '\n' {
                                line += 1;
                            }
                            value.push(escaped);
                        }
                        None => return Err(Error::Escape(line)),
                    },
                    '\n' => {
                        end = Some(eq + 1 + i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            // A value must end in a newline: otherwise it ran into the end of the block.
            let end = end.ok_or(Error::Line(line))?;
            env.set_unchecked(name, &value);
            rest = &rest[end..];
        }
        Ok(env)
    }

    /// The block GRUB would read back as these variables: exactly [`BLOCK_SIZE`] bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let mut text = String::from(HEADER);
        for (name, value) in &self.vars {
            text.push_str(name);
            text.push('=');
            escape(value, &mut text);
            text.push('\n');
        }
        if text.len() > BLOCK_SIZE {
            return Err(Error::Full {
                needed: text.len() - HEADER.len(),
                room: BLOCK_SIZE - HEADER.len(),
            });
        }
        let mut block = text.into_bytes();
        block.resize(BLOCK_SIZE, b'#');
        Ok(block)
    }

    /// Reads and parses the block at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let data = std::fs::read(path).map_err(|e| Error::Read(path.to_owned(), e))?;
        Self::parse(&data)
    }

    /// Writes the block to `path` atomically (temp file, fsync, rename): a crash leaves the old
    /// block or the new one, never a torn one GRUB would refuse.
    pub fn store(&self, path: &Path) -> Result<(), Error> {
        let block = self.to_bytes()?;
        hvnode_base::fs::write_atomic(path, &block, 0o644)
            .map_err(|e| Error::Write(path.to_owned(), e))
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `name` to `value`, keeping its place if it was set. Refuses an invalid name, and a
    /// value that would not fit in the block (the environment is then unchanged).
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), Error> {
        if !valid_name(name) {
            return Err(Error::Name(name.to_owned()));
        }
        let before = self.clone();
        self.set_unchecked(name, value);
        if let Err(e) = self.to_bytes() {
            *self = before;
            return Err(e);
        }
        Ok(())
    }

    fn set_unchecked(&mut self, name: &str, value: &str) {
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value.to_owned(),
            None => self.vars.push((name.to_owned(), value.to_owned())),
        }
    }

    /// Removes `name`; true if it was set.
    pub fn remove(&mut self, name: &str) -> bool {
        let len = self.vars.len();
        self.vars.retain(|(n, _)| n != name);
        self.vars.len() != len
    }

    /// The variables in block order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(body: &str) -> Vec<u8> {
        let mut b = format!("{HEADER}{body}").into_bytes();
        b.resize(BLOCK_SIZE, b'#');
        b
    }

    #[test]
    fn empty_block_is_header_and_padding() {
        let b = GrubEnv::new().to_bytes().unwrap();
        assert_eq!(b.len(), BLOCK_SIZE);
        assert!(b.starts_with(HEADER.as_bytes()));
        assert!(b[HEADER.len()..].iter().all(|&c| c == b'#'));
        assert_eq!(GrubEnv::parse(&b).unwrap(), GrubEnv::new());
    }

    #[test]
    fn parses_what_grub_editenv_writes() {
        let env = GrubEnv::parse(&block("ORDER=A B\nA_OK=1\nsaved_entry=0\n")).unwrap();
        assert_eq!(env.get("ORDER"), Some("A B"));
        assert_eq!(env.get("A_OK"), Some("1"));
        assert_eq!(env.get("saved_entry"), Some("0"));
        assert_eq!(env.get("B_OK"), None);
        let names: Vec<_> = env.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["ORDER", "A_OK", "saved_entry"]);
    }

    #[test]
    fn writes_byte_for_byte_what_grub_editenv_writes() {
        let mut env = GrubEnv::new();
        env.set("ORDER", "A B").unwrap();
        env.set("A_OK", "1").unwrap();
        assert_eq!(env.to_bytes().unwrap(), block("ORDER=A B\nA_OK=1\n"));
    }

    #[test]
    fn escapes_backslash_and_newline_and_reads_them_back() {
        let mut env = GrubEnv::new();
        env.set("x", "a\\b\nc").unwrap();
        let b = env.to_bytes().unwrap();
        assert!(b.starts_with(format!("{HEADER}x=a\\\\b\\\nc\n").as_bytes()));
        assert_eq!(GrubEnv::parse(&b).unwrap().get("x"), Some("a\\b\nc"));
    }

    #[test]
    fn set_keeps_the_place_of_an_existing_variable() {
        let mut env = GrubEnv::parse(&block("a=1\nb=2\n")).unwrap();
        env.set("a", "3").unwrap();
        assert_eq!(env.to_bytes().unwrap(), block("a=3\nb=2\n"));
        assert!(env.remove("a"));
        assert!(!env.remove("a"));
        assert_eq!(env.to_bytes().unwrap(), block("b=2\n"));
    }

    #[test]
    fn skips_comment_lines() {
        let env = GrubEnv::parse(&block("# written by hand\na=1\n")).unwrap();
        assert_eq!(env.get("a"), Some("1"));
    }

    #[test]
    fn refuses_a_block_of_the_wrong_size() {
        let mut b = block("a=1\n");
        b.push(b'#');
        assert!(matches!(GrubEnv::parse(&b), Err(Error::Size(1025))));
        assert!(matches!(GrubEnv::parse(&b[..1000]), Err(Error::Size(1000))));
        assert!(matches!(GrubEnv::parse(&[]), Err(Error::Size(0))));
    }

    #[test]
    fn refuses_a_block_without_the_header() {
        let mut b = block("a=1\n");
        b[2] = b'g';
        assert!(matches!(GrubEnv::parse(&b), Err(Error::Header)));
    }

    #[test]
    fn refuses_malformed_lines() {
        assert!(matches!(
            GrubEnv::parse(&block("a=1\nnoequals\n")),
            Err(Error::Line(3))
        ));
        assert!(matches!(
            GrubEnv::parse(&block("bad name=1\n")),
            Err(Error::Line(2))
        ));
        // A value running into the end of the block has no newline.
        let mut b = format!("{HEADER}a=").into_bytes();
        b.resize(BLOCK_SIZE, b'x');
        assert!(matches!(GrubEnv::parse(&b), Err(Error::Line(2))));
        let mut b = format!("{HEADER}a=").into_bytes();
        b.resize(BLOCK_SIZE - 1, b'x');
        b.push(b'\\');
        assert!(matches!(GrubEnv::parse(&b), Err(Error::Escape(2))));
        let mut b = block("a=1\n");
        b[HEADER.len() + 2] = 0xff;
        assert!(matches!(GrubEnv::parse(&b), Err(Error::Utf8)));
    }

    #[test]
    fn refuses_invalid_names() {
        let mut env = GrubEnv::new();
        for bad in ["", "a=b", "a b", "#a", "a\nb", "a\\b"] {
            assert!(matches!(env.set(bad, "1"), Err(Error::Name(_))), "{bad:?}");
        }
        assert_eq!(env, GrubEnv::new());
    }

    #[test]
    fn refuses_a_value_that_does_not_fit_and_keeps_the_old_one() {
        let mut env = GrubEnv::new();
        env.set("a", "1").unwrap();
        let room = BLOCK_SIZE - HEADER.len();
        // "a=" + value + "\n" fills the block exactly.
        env.set("a", &"x".repeat(room - 3)).unwrap();
        let b = env.to_bytes().unwrap();
        assert_eq!(b.len(), BLOCK_SIZE);
        assert_eq!(*b.last().unwrap(), b'\n');
        env.set("a", "1").unwrap();
        let err = env.set("a", &"x".repeat(room - 2)).unwrap_err();
        assert!(matches!(err, Error::Full { needed, room: r } if needed == room + 1 && r == room));
        assert_eq!(env.get("a"), Some("1"));
        // Escaping counts: each backslash takes two bytes.
        assert!(env.set("a", &"\\".repeat(room / 2)).is_err());
    }

    #[test]
    fn mangled_blocks_never_panic_and_what_parses_round_trips() {
        // Blocks derived from a valid one by random byte changes (xorshift, fixed seed): the
        // parser must refuse or accept without panicking, and what it accepts must write back
        // to a block that reads the same.
        let mut env = GrubEnv::new();
        env.set("ORDER", "A B").unwrap();
        env.set("A_OK", "1").unwrap();
        env.set("x", "a\\b\nc").unwrap();
        let good = env.to_bytes().unwrap();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"=#\\\nAB_01 \xff";
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = HEADER.len() + (next() as usize) % 40;
                b[at] = alphabet[(next() as usize) % alphabet.len()];
            }
            if let Ok(parsed) = GrubEnv::parse(&b) {
                accepted += 1;
                let again = GrubEnv::parse(&parsed.to_bytes().unwrap()).unwrap();
                assert_eq!(again, parsed);
            }
        }
        assert!(accepted > 100, "only {accepted} mangled blocks parsed");
    }

    #[test]
    fn store_and_load_round_trip_through_a_file() {
        let dir = std::env::temp_dir().join(format!("hvnode-grubenv-{}", std::process::id()));
        let path = dir.join("grubenv");
        let mut env = GrubEnv::new();
        env.set("ORDER", "B A").unwrap();
        env.store(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), BLOCK_SIZE as u64);
        assert_eq!(GrubEnv::load(&path).unwrap(), env);
        assert!(matches!(
            GrubEnv::load(&dir.join("missing")),
            Err(Error::Read(..))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
