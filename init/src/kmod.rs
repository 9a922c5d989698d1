//! Kernel modules: loading with `finit_module`, the initrd's ordered list, and coldplug
//! (every `modalias` under /sys/devices matched against `modules.alias`, dependencies
//! from `modules.dep` loaded first).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::CString;
use std::path::{Path, PathBuf};

use nix::kmod::{finit_module, ModuleInitFlags};

use crate::out;

/// `MODULE_INIT_COMPRESSED_FILE`: let the kernel decompress `.ko.xz`/`.ko.zst`.
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// Errors of module loading.
#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    /// The module file could not be opened.
    #[error("Cannot open module {path}: {source}")]
    Open {
        /// Module file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The kernel refused the module.
    #[error("Kernel refused module {path}: {source}")]
    Load {
        /// Module file.
        path: PathBuf,
        /// The cause.
        source: nix::Error,
    },
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The module directory of the running kernel.
pub fn module_dir() -> PathBuf {
    Path::new("/usr/lib/modules").join(kernel_release())
}

/// Loads one module file. Returns `Ok(false)` when it was already loaded.
pub fn load_file(path: &Path) -> Result<bool, KmodError> {
    let file = std::fs::File::open(path).map_err(|source| KmodError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path.to_string_lossy();
    let flags = if name.ends_with(".xz") || name.ends_with(".zst") || name.ends_with(".gz") {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    };
    match finit_module(&file, &CString::default(), flags) {
        Ok(()) => Ok(true),
        Err(nix::Error::EEXIST) => Ok(false),
        Err(source) => Err(KmodError::Load {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Loads the initrd's module list (paths relative to the module directory, one a line, in
/// dependency order). Failures are logged and skipped: under TCG some CPU-specific
/// modules fail with ENODEV, which is harmless.
pub fn load_list(list: &Path, dir: &Path) -> usize {
    let text = std::fs::read_to_string(list).unwrap_or_default();
    let mut loaded = 0;
    for rel in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match load_file(&dir.join(rel)) {
            Ok(true) => loaded += 1,
            Ok(false) => {}
            Err(e) => out::log_only(&format!("init: module skipped: {e}")),
        }
    }
    loaded
}

/// Module name as the kernel and `modules.alias` spell it: file stem, `-` → `_`.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// `modules.alias`: patterns grouped by bus prefix (the text before the first `:`), so a
/// modalias is only matched against its own bus.
#[derive(Debug, Default)]
pub struct AliasTable {
    by_prefix: HashMap<String, Vec<(String, String)>>,
    /// Patterns whose prefix itself contains a wildcard.
    other: Vec<(String, String)>,
}

impl AliasTable {
    /// Parses `alias PATTERN MODULE` lines.
    pub fn parse(text: &str) -> Self {
        let mut t = Self::default();
        for line in text.lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("alias") {
                continue;
            }
            let (Some(pattern), Some(module)) = (w.next(), w.next()) else {
                continue;
            };
            let entry = (pattern.to_owned(), module.replace('-', "_"));
            match pattern.split_once(':') {
                Some((prefix, _)) if !prefix.contains(['*', '?', '[']) => {
                    t.by_prefix
                        .entry(prefix.to_owned())
                        .or_default()
                        .push(entry);
                }
                _ => t.other.push(entry),
            }
        }
        t
    }

    /// Modules whose alias pattern matches `modalias`, in table order, without repeats.
    pub fn lookup(&self, modalias: &str) -> Vec<String> {
        let prefix = modalias.split_once(':').map(|(p, _)| p).unwrap_or(modalias);
        let mut out: Vec<String> = Vec::new();
        let group = self.by_prefix.get(prefix).map(Vec::as_slice).unwrap_or(&[]);
        for (pattern, module) in group.iter().chain(self.other.iter()) {
            if glob_match(pattern.as_bytes(), modalias.as_bytes()) && !out.contains(module) {
                out.push(module.clone());
            }
        }
        out
    }
}

/// fnmatch(3)-style matching without flags: `*`, `?`, `[...]` with ranges and `!`/`^`.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = match_class(pattern, p, text[t]) {
                        if matched {
                            p = next;
                            t += 1;
                            continue;
                        }
                    } else if text[t] == b'[' {
                        // An unterminated class is a literal '['.
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
                c if c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class starting at `pattern[start] == '['`. Returns whether it
/// matched and the index after the class, or `None` if the class is not terminated.
fn match_class(pattern: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(pattern.get(i), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let cur = *pattern.get(i)?;
        if cur == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|&e| e != b']') {
            let end = pattern[i + 2];
            if cur <= c && c <= end {
                matched = true;
            }
            i += 3;
        } else {
            if cur == c {
                matched = true;
            }
            i += 1;
        }
    }
}

/// `modules.dep`: module name → (file, dependency files).
#[derive(Debug, Default)]
pub struct DepTable {
    modules: HashMap<String, (String, Vec<String>)>,
}

impl DepTable {
    /// Parses `path.ko: dep1.ko dep2.ko` lines.
    pub fn parse(text: &str) -> Self {
        let mut modules = HashMap::new();
        for line in text.lines() {
            let Some((file, deps)) = line.split_once(':') else {
                continue;
            };
            let file = file.trim();
            if file.is_empty() {
                continue;
            }
            let deps = deps.split_whitespace().map(str::to_owned).collect();
            modules.insert(module_name(file), (file.to_owned(), deps));
        }
        Self { modules }
    }

    /// Whether the module exists as a loadable file.
    pub fn contains(&self, name: &str) -> bool {
        self.modules.contains_key(name)
    }

    /// The files to load for `name`, dependencies first, each once. Empty when the module
    /// is unknown (built into the kernel, or absent).
    pub fn load_order(&self, name: &str) -> Vec<String> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        self.visit(name, &mut seen, &mut order);
        order
    }

    fn visit(&self, name: &str, seen: &mut HashSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        let Some((file, deps)) = self.modules.get(name) else {
            return;
        };
        // depmod lists the deepest dependencies last; visiting them first and recursing
        // keeps the order right even if a line is incomplete.
        for dep in deps.iter().rev() {
            self.visit(&module_name(dep), seen, order);
        }
        order.push(file.clone());
    }
}

/// Loads modules by name with their dependencies, remembering what was tried.
#[derive(Debug)]
pub struct Loader {
    dir: PathBuf,
    aliases: AliasTable,
    deps: DepTable,
    tried: HashSet<String>,
}

impl Loader {
    /// Reads `modules.alias` and `modules.dep` of `dir`.
    pub fn new(dir: &Path) -> Self {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        Self {
            dir: dir.to_path_buf(),
            aliases: AliasTable::parse(&read("modules.alias")),
            deps: DepTable::parse(&read("modules.dep")),
            tried: HashSet::new(),
        }
    }

    /// Whether `name` is a loadable module of this kernel.
    pub fn has(&self, name: &str) -> bool {
        self.deps.contains(name)
    }

    /// Loads `name` and its dependencies. Returns how many files were newly loaded.
    pub fn load(&mut self, name: &str) -> usize {
        let mut n = 0;
        for file in self.deps.load_order(name) {
            if !self.tried.insert(file.clone()) {
                continue;
            }
            match load_file(&self.dir.join(&file)) {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => out::log_only(&format!("init: module skipped: {e}")),
            }
        }
        n
    }

    /// Loads the modules matching every modalias under `sysfs_devices`. Returns how many
    /// files were newly loaded.
    pub fn coldplug(&mut self, sysfs_devices: &Path) -> usize {
        let mut names = BTreeSet::new();
        for alias in collect_modaliases(sysfs_devices) {
            names.extend(self.aliases.lookup(&alias));
        }
        names.iter().map(|n| self.load(n)).sum()
    }
}

/// Every `modalias` value under a sysfs directory (symlinks are not followed).
pub fn collect_modaliases(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && e.file_name() == "modalias" {
                if let Ok(v) = std::fs::read_to_string(e.path()) {
                    let v = v.trim();
                    if !v.is_empty() {
                        out.insert(v.to_owned());
                    }
                }
            }
        }
    }
    out
}

/// The KVM module for this CPU, from the `vendor_id` in /proc/cpuinfo.
pub fn kvm_vendor_module(cpuinfo: &str) -> Option<&'static str> {
    let vendor = cpuinfo
        .lines()
        .find(|l| l.starts_with("vendor_id"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim())?;
    match vendor {
        "GenuineIntel" | "CentaurHauls" => Some("kvm_intel"),
        "AuthenticAMD" | "HygonGenuine" => Some("kvm_amd"),
        _ => None,
    }
}

/// The main stage's module set: coldplug twice, then what a hypervisor node always needs.
pub fn load_main_stage() {
    let dir = module_dir();
    let mut loader = Loader::new(&dir);
    let sys = Path::new("/sys/devices");
    let mut n = loader.coldplug(sys);
    let mut always = vec!["kvm"];
    if let Some(v) =
        kvm_vendor_module(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
    {
        always.push(v);
    }
    always.extend([
        "tun",
        "bridge",
        "bonding",
        "8021q",
        "evdev",
        "button",
        "vhost_net",
        // The cluster's storage domains (NFSv4 mounts by the agent).
        "nfsv4",
    ]);
    for m in always {
        if loader.has(m) {
            n += loader.load(m);
        }
    }
    // Loading bus drivers makes new devices (and modaliases) appear.
    n += loader.coldplug(sys);
    out::log_only(&format!("init: modules: {n} loaded from {}", dir.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIASES: &str = "\
# Aliases extracted from modules themselves.
alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e
alias pci:v00001AF4d00001000sv*sd*bc*sc*i* virtio_net
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias virtio:d00000001v* virtio_net
alias acpi*:PNP0C0C:* button
alias usb:v*p*d*dc*dsc*dp*ic08isc06ip50in* usb_storage
alias cpu:type:x86,ven*fam*mod*:feature:*0081* kvm-intel
alias of:N*T*Cfoo[0-9]C* foo_drv
";

    #[test]
    fn alias_matches_pci_and_virtio_devices() {
        let t = AliasTable::parse(ALIASES);
        assert_eq!(
            t.lookup("pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"),
            vec!["virtio_net".to_owned(), "virtio_pci".to_owned()]
        );
        assert_eq!(
            t.lookup("virtio:d00000001v00001AF4"),
            vec!["virtio_net".to_owned()]
        );
        assert_eq!(
            t.lookup("pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00"),
            vec!["e1000e".to_owned()]
        );
        assert!(t
            .lookup("pci:v000010ECd00008139sv00001AF4sd00001100bc02sc00i00")
            .is_empty());
    }

    #[test]
    fn alias_with_wildcard_prefix_and_class_matches() {
        let t = AliasTable::parse(ALIASES);
        assert_eq!(
            t.lookup("acpi:LNXPWRBN:PNP0C0C:"),
            vec!["button".to_owned()]
        );
        assert_eq!(t.lookup("of:NbusTdevCfoo7C"), vec!["foo_drv".to_owned()]);
        assert!(t.lookup("of:NbusTdevCfooxC").is_empty());
        assert_eq!(
            t.lookup("cpu:type:x86,ven0000fam0006mod003A:feature:,0000,0081,00A0"),
            vec!["kvm_intel".to_owned()]
        );
    }

    #[test]
    fn usb_interface_alias_matches_mass_storage_only() {
        let t = AliasTable::parse(ALIASES);
        assert_eq!(
            t.lookup("usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00"),
            vec!["usb_storage".to_owned()]
        );
        assert!(t
            .lookup("usb:v0627p0001d0000dc00dsc00dp00ic03isc00ip00in00")
            .is_empty());
    }

    #[test]
    fn glob_handles_stars_questions_and_negated_classes() {
        assert!(glob_match(b"a*b*c", b"axxbyyc"));
        assert!(glob_match(b"a*", b"a"));
        assert!(!glob_match(b"a*b", b"axxc"));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(!glob_match(b"a?c", b"ac"));
        assert!(glob_match(b"x[!0-9]y", b"xay"));
        assert!(!glob_match(b"x[!0-9]y", b"x5y"));
        assert!(glob_match(b"x[]]y", b"x]y"));
        assert!(glob_match(b"x[y", b"x[y"));
        assert!(glob_match(b"***", b""));
    }

    const DEPS: &str = "\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/arch/x86/kvm/kvm-intel.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/virt/lib/irqbypass.ko:
kernel/drivers/block/loop.ko.xz:
";

    #[test]
    fn dependencies_load_first_and_once() {
        let d = DepTable::parse(DEPS);
        assert_eq!(
            d.load_order("virtio_net"),
            vec![
                "kernel/net/core/failover.ko".to_owned(),
                "kernel/drivers/net/net_failover.ko".to_owned(),
                "kernel/drivers/net/virtio_net.ko".to_owned(),
            ]
        );
        assert_eq!(
            d.load_order("kvm_intel"),
            vec![
                "kernel/virt/lib/irqbypass.ko".to_owned(),
                "kernel/arch/x86/kvm/kvm.ko".to_owned(),
                "kernel/arch/x86/kvm/kvm-intel.ko".to_owned(),
            ]
        );
    }

    #[test]
    fn unknown_or_builtin_module_loads_nothing() {
        let d = DepTable::parse(DEPS);
        assert!(d.load_order("ext4").is_empty());
        assert!(d.contains("loop"));
        assert!(!d.contains("ext4"));
    }

    #[test]
    fn module_names_drop_directory_suffix_and_dashes() {
        assert_eq!(module_name("kernel/arch/x86/kvm/kvm-intel.ko"), "kvm_intel");
        assert_eq!(module_name("kernel/drivers/block/loop.ko.xz"), "loop");
        assert_eq!(module_name("8021q.ko"), "8021q");
    }

    #[test]
    fn kvm_module_follows_cpu_vendor() {
        assert_eq!(
            kvm_vendor_module("processor\t: 0\nvendor_id\t: GenuineIntel\n"),
            Some("kvm_intel")
        );
        assert_eq!(
            kvm_vendor_module("vendor_id\t: AuthenticAMD\n"),
            Some("kvm_amd")
        );
        assert_eq!(kvm_vendor_module("vendor_id\t: Unknown\n"), None);
        assert_eq!(kvm_vendor_module(""), None);
    }
}
