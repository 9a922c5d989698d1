//! What the server's screen shows, read as a person would read it: the VGA text buffer under BIOS
//! (the characters at 0xB8000), and the framebuffer under UEFI (a screendump whose 8x16 cells are
//! matched against the glyphs of the kernel's own console font, taken from the kernel image that
//! boots).

use std::collections::HashMap;

/// Rows of text as they appear on the screen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextScreen {
    /// One string per row, trailing blanks kept.
    pub rows: Vec<String>,
}

impl TextScreen {
    /// Whether any row contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.rows.iter().any(|r| r.contains(needle))
    }
}

impl std::fmt::Display for TextScreen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for r in &self.rows {
            writeln!(f, "|{}|", r.trim_end())?;
        }
        Ok(())
    }
}

/// The character a VGA text cell shows: ASCII as itself, anything else (CP437 line drawing,
/// symbols) as `?`.
fn cp437(b: u8) -> char {
    if (0x20..0x7f).contains(&b) {
        b as char
    } else if b == 0 {
        ' '
    } else {
        '?'
    }
}

/// Bytes per row of the 80-column text mode (character and attribute per cell).
const TEXT_ROW: usize = 160;

/// The visible screen in a dump of VGA text memory (0xB8000, 32 KiB): Linux's VGA console scrolls
/// by moving the display start through that memory, so the screen is the `rows` rows that begin
/// at the row whose text satisfies `is_top`. Refuses when no row or more than one row does:
/// two tops mean the screen scrolled after the first was drawn.
pub fn vga_text_screen(
    mem: &[u8],
    rows: usize,
    is_top: impl Fn(&str) -> bool,
) -> Result<TextScreen, String> {
    let all: Vec<String> = mem
        .chunks_exact(TEXT_ROW)
        .map(|row| row.chunks_exact(2).map(|cell| cp437(cell[0])).collect())
        .collect();
    let tops: Vec<usize> = (0..all.len()).filter(|&i| is_top(&all[i])).collect();
    match tops.as_slice() {
        [top] if top + rows <= all.len() => Ok(TextScreen {
            rows: all[*top..top + rows].to_vec(),
        }),
        [] => Err("no screen top in the VGA text memory".to_owned()),
        [_] => Err("the screen top is too close to the end of VGA text memory".to_owned()),
        many => Err(format!(
            "{} screen tops in the VGA text memory (rows {many:?}): the screen scrolled",
            many.len()
        )),
    }
}

/// An RGB picture.
#[derive(Debug, Clone)]
pub struct Picture {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major RGB pixels.
    pub pixels: Vec<[u8; 3]>,
}

/// Parses a binary PPM (P6, maxval 255), what QEMU's `screendump` writes.
pub fn parse_ppm(data: &[u8]) -> Result<Picture, String> {
    let mut fields = Vec::new();
    let mut i = 0;
    while fields.len() < 4 {
        while i < data.len() && data[i].is_ascii_whitespace() {
            i += 1;
        }
        if data.get(i) == Some(&b'#') {
            while i < data.len() && data[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        let start = i;
        while i < data.len() && !data[i].is_ascii_whitespace() {
            i += 1;
        }
        if start == i {
            return Err("truncated PPM header".to_owned());
        }
        fields.push(String::from_utf8_lossy(&data[start..i]).into_owned());
    }
    i += 1;
    let num = |s: &str| {
        s.parse::<usize>()
            .map_err(|_| format!("bad PPM field {s:?}"))
    };
    if fields[0] != "P6" || fields[3] != "255" {
        return Err(format!("not a P6/255 PPM: {fields:?}"));
    }
    let (width, height) = (num(&fields[1])?, num(&fields[2])?);
    let body = data
        .get(i..i + width * height * 3)
        .ok_or("truncated PPM pixels")?;
    Ok(Picture {
        width,
        height,
        pixels: body.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect(),
    })
}

/// An 8x16 console font: 256 glyphs of 16 rows, one byte per row, bit 7 leftmost.
#[derive(Debug, Clone)]
pub struct Font {
    glyphs: HashMap<[u8; 16], char>,
}

/// The start of the VGA 8x16 font as Linux builds it in (`font_vga_8x16`): glyph 0 (blank) and
/// glyph 1 (the smiling face), enough to find the table in a kernel image.
const FONT_SIGNATURE: [u8; 32] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
    0x00, 0x00, 0x7e, 0x81, 0xa5, 0x81, 0x81, 0xbd, 0x99, 0x81, 0x81, 0x7e, 0x00, 0x00, 0x00, 0x00,
];

impl Font {
    /// Finds the 8x16 font table in an uncompressed kernel (vmlinux bytes) and keeps the
    /// printable ASCII glyphs.
    pub fn from_vmlinux(kernel: &[u8]) -> Result<Font, String> {
        let at = kernel
            .windows(FONT_SIGNATURE.len())
            .position(|w| w == FONT_SIGNATURE)
            .ok_or("no VGA 8x16 font table in the kernel")?;
        let table = kernel
            .get(at..at + 256 * 16)
            .ok_or("the kernel's font table is truncated")?;
        Ok(Font::from_table(table))
    }

    /// A font from a 4096-byte glyph table.
    pub fn from_table(table: &[u8]) -> Font {
        let mut glyphs = HashMap::new();
        for c in (0x21u8..0x7f).rev() {
            let mut g = [0u8; 16];
            g.copy_from_slice(&table[usize::from(c) * 16..usize::from(c) * 16 + 16]);
            glyphs.insert(g, c as char);
        }
        Font { glyphs }
    }

    /// The character a glyph bitmap shows, if it is printable ASCII (blank is a space).
    fn char_of(&self, g: &[u8; 16]) -> Option<char> {
        if g.iter().all(|b| *b == 0) {
            return Some(' ');
        }
        self.glyphs.get(g).copied()
    }

    /// Reads the text of a framebuffer console: 8x16 cells from the top left corner. In each cell
    /// the background is the colour of most pixels and every other pixel is ink; a cell whose
    /// ink is no glyph of the font (a cursor, a line-drawing character) reads as `?`.
    pub fn read(&self, pic: &Picture) -> TextScreen {
        let (cols, rows) = (pic.width / 8, pic.height / 16);
        let mut out = Vec::with_capacity(rows);
        for row in 0..rows {
            let mut line = String::with_capacity(cols);
            for col in 0..cols {
                let px = |x: usize, y: usize| pic.pixels[(row * 16 + y) * pic.width + col * 8 + x];
                let mut counts: HashMap<[u8; 3], usize> = HashMap::new();
                for y in 0..16 {
                    for x in 0..8 {
                        *counts.entry(px(x, y)).or_default() += 1;
                    }
                }
                let bg = counts
                    .into_iter()
                    .max_by_key(|(_, n)| *n)
                    .map(|(c, _)| c)
                    .unwrap_or_default();
                let mut g = [0u8; 16];
                for (y, byte) in g.iter_mut().enumerate() {
                    for x in 0..8 {
                        if px(x, y) != bg {
                            *byte |= 0x80 >> x;
                        }
                    }
                }
                line.push(self.char_of(&g).unwrap_or('?'));
            }
            out.push(line);
        }
        TextScreen { rows: out }
    }
}

/// The uncompressed kernel inside a bzImage: the payload is searched for a known compressed
/// stream (xz, zstd or gzip) and unpacked with the host's tool.
pub fn vmlinux_of_bzimage(bzimage: &std::path::Path) -> Result<Vec<u8>, String> {
    let data = std::fs::read(bzimage).map_err(|e| format!("{}: {e}", bzimage.display()))?;
    let formats: [(&[u8], &str); 3] = [
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"\x1f\x8b\x08\x00", "gzip"),
    ];
    for (magic, tool) in formats {
        let Some(at) = data.windows(magic.len()).position(|w| w == magic) else {
            continue;
        };
        let mut child = std::process::Command::new(tool)
            .args(["-d", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("{tool}: {e}"))?;
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        let payload = data[at..].to_vec();
        // The payload is followed by the kernel's trailer, which the tool reports as trailing
        // garbage after the stream it unpacked: its output is complete all the same.
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(&payload);
        });
        let out = child
            .wait_with_output()
            .map_err(|e| format!("{tool}: {e}"))?;
        let _ = writer.join();
        if out.stdout.starts_with(b"\x7fELF") {
            return Ok(out.stdout);
        }
    }
    Err(format!(
        "no xz, zstd or gzip kernel payload in {}",
        bzimage.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn font() -> (Vec<u8>, Font) {
        let mut table = vec![0u8; 4096];
        // Sparse like real glyphs (ink is the minority of a cell), each one different.
        for c in 0..256usize {
            table[c * 16] = c as u8;
            for y in 1..16 {
                table[c * 16 + y] = 1 << (y % 8);
            }
        }
        let font = Font::from_table(&table);
        (table, font)
    }

    #[test]
    fn reads_framebuffer_cells_in_any_colours() {
        let (table, font) = font();
        let text = "Hi!";
        let (w, h) = (8 * 4, 16);
        let mut pixels = vec![[0, 0, 170]; w * h];
        for (i, c) in text.bytes().enumerate() {
            for y in 0..16 {
                for x in 0..8 {
                    if table[usize::from(c) * 16 + y] & (0x80 >> x) != 0 {
                        pixels[y * w + i * 8 + x] = [255, 255, 85];
                    }
                }
            }
        }
        let screen = font.read(&Picture {
            width: w,
            height: h,
            pixels,
        });
        assert_eq!(screen.rows, vec!["Hi! ".to_owned()]);
    }

    #[test]
    fn finds_the_visible_text_screen_and_refuses_a_scrolled_one() {
        let mut mem = vec![0u8; 32768];
        let put = |mem: &mut Vec<u8>, row: usize, s: &str| {
            for (i, b) in s.bytes().enumerate() {
                mem[row * 160 + i * 2] = b;
                mem[row * 160 + i * 2 + 1] = 0x07;
            }
        };
        put(&mut mem, 3, "old boot line");
        put(&mut mem, 40, ">1 Status< 2 Network");
        put(&mut mem, 41, "hvnode: Status");
        let s = vga_text_screen(&mem, 25, |r| r.contains("1 Status")).unwrap();
        assert_eq!(s.rows.len(), 25);
        assert!(s.contains("hvnode: Status"));
        assert!(!s.contains("old boot line"));
        put(&mut mem, 80, ">1 Status< 2 Network");
        assert!(vga_text_screen(&mem, 25, |r| r.contains("1 Status")).is_err());
    }

    #[test]
    fn parses_ppm_with_comments() {
        let mut data = b"P6\n# qemu\n2 1\n255\n".to_vec();
        data.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        let p = parse_ppm(&data).unwrap();
        assert_eq!((p.width, p.height), (2, 1));
        assert_eq!(p.pixels, vec![[1, 2, 3], [4, 5, 6]]);
        assert!(parse_ppm(b"P3\n1 1\n255\n").is_err());
    }
}
