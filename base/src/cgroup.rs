//! A cgroup per guest, holding its VMM to the guest's memory, CPU and process limits
//! (docs/vmm.md#the-jail).
//!
//! Guests' cgroups go in `<group>/<name>` (the node's agent's group is [`GUESTS`]) next to the
//! caller's own cgroup (in its parent, or in
//! the root when the caller is in the root), never below it: cgroup v2 allows no process in a
//! cgroup whose children have controllers, and the caller's own cgroup (the agent's) stays free
//! of the guests' limits. On the node init puts the agent in `/hvnode/agent`, so guests land in
//! `/sys/fs/cgroup/hvnode/guests/<name>`.
//!
//! cgroup v2 is used when it is mounted with the `memory`, `cpu` and `pids` controllers
//! available; otherwise the cgroup v1 hierarchies of those three controllers are (each its own
//! `guests/<name>`), as Firecracker's jailer does with `--cgroup-version 1`. Neither means
//! [`CgroupError::Unavailable`], saying what was found: guests are not started unlimited
//! without anyone knowing.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The CPU bandwidth period every guest's quota is counted in.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The controllers a guest's cgroup needs.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// The group guests' cgroups go in, next to the caller's own: the node agent's.
pub const GUESTS: &str = "guests";

/// What a guest's cgroup holds its VMM to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory (anonymous, page cache and kernel memory charged to it), in bytes.
    pub memory_bytes: u64,
    /// CPU time per [`CPU_PERIOD_US`], in microseconds (200 000: two CPUs' worth).
    pub cpu_quota_us: u64,
    /// Processes and threads.
    pub pids: u64,
}

/// Errors making, filling or removing a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No usable cgroup hierarchy.
    #[error("No cgroup to hold guests to their limits: {0}")]
    Unavailable(String),
    /// A cgroup file or directory.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |e| CgroupError::Io(path.display().to_string(), e)
}

/// Which cgroup version a [`Cgroup`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The unified hierarchy: one directory.
    V2,
    /// One directory in each of the memory, cpu and pids hierarchies.
    V1,
}

/// Where the cgroup hierarchies are and where the caller sits in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The cgroup v2 directory guests go next to, if v2 has the controllers.
    v2: Option<PathBuf>,
    /// For each v1 controller found: the directory guests go next to.
    v1: Vec<(&'static str, PathBuf)>,
    /// What was found, for an error that says so.
    found: String,
}

/// A directory of a cgroup, with its v1 controller (`None` in v2).
type Dir = (Option<&'static str>, PathBuf);

/// One mount of `/proc/self/mountinfo`: its root within the filesystem, where it is mounted,
/// its type and its super options.
struct Mount<'a> {
    root: &'a str,
    point: &'a str,
    fstype: &'a str,
    options: &'a str,
}

fn mounts(mountinfo: &str) -> impl Iterator<Item = Mount<'_>> {
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let left: Vec<&str> = left.split(' ').collect();
        let mut right = right.split(' ');
        Some(Mount {
            root: left.get(3)?,
            point: left.get(4)?,
            fstype: right.next()?,
            options: right.nth(1)?,
        })
    })
}

/// The directory next to which guests go: the parent of `own` (the caller's cgroup path) as
/// seen through the mount at `point` whose root is `root`, or the mount point itself.
fn beside(point: &str, root: &str, own: &str) -> Option<PathBuf> {
    let rel = Path::new(own).strip_prefix(root).ok()?;
    let parent = rel.parent().unwrap_or(Path::new(""));
    Some(Path::new(point).join(parent))
}

impl Layout {
    /// Reads the layout of the calling process.
    pub fn of_this_process() -> Result<Layout, CgroupError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io(Path::new("/proc/self/mountinfo")))?;
        let cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(io(Path::new("/proc/self/cgroup")))?;
        Ok(Layout::parse(&mountinfo, &cgroup, |dir| {
            std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default()
        }))
    }

    /// The layout from `/proc/self/mountinfo`, `/proc/self/cgroup` and the `cgroup.controllers`
    /// a directory reads.
    fn parse(mountinfo: &str, cgroup: &str, controllers: impl Fn(&Path) -> String) -> Layout {
        let own = |wanted: &str| {
            cgroup.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
                let hit = if wanted.is_empty() {
                    list.is_empty()
                } else {
                    list.split(',').any(|c| c == wanted)
                };
                hit.then_some(path)
            })
        };
        let mut found = Vec::new();
        let v2 = mounts(mountinfo)
            .find(|m| m.fstype == "cgroup2")
            .and_then(|m| {
                let dir = beside(m.point, m.root, own("")?)?;
                let have = controllers(&dir);
                found.push(format!(
                    "cgroup2 at {} with controllers [{}]",
                    m.point,
                    have.trim()
                ));
                let all = CONTROLLERS
                    .iter()
                    .all(|c| have.split_whitespace().any(|h| h == *c));
                all.then_some(dir)
            });
        let v1: Vec<(&'static str, PathBuf)> = CONTROLLERS
            .iter()
            .filter_map(|&c| {
                let m = mounts(mountinfo)
                    .find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == c))?;
                Some((c, beside(m.point, m.root, own(c)?)?))
            })
            .collect();
        if !v1.is_empty() {
            let names: Vec<&str> = v1.iter().map(|(c, _)| *c).collect();
            found.push(format!("cgroup v1 hierarchies of {}", names.join(", ")));
        }
        if found.is_empty() {
            found.push("no cgroup filesystem mounted".into());
        }
        Layout {
            v2,
            v1,
            found: found.join("; "),
        }
    }

    /// The directories guest `name`'s cgroup in `group` is made of, and its version.
    fn dirs(&self, group: &str, name: &str) -> Result<(Version, Vec<Dir>), CgroupError> {
        for part in [group, name] {
            if part.is_empty() || part.contains('/') || part.starts_with('.') {
                return Err(CgroupError::Unavailable(format!(
                    "{part:?} cannot name a cgroup"
                )));
            }
        }
        if let Some(base) = &self.v2 {
            return Ok((Version::V2, vec![(None, base.join(group).join(name))]));
        }
        if self.v1.len() == CONTROLLERS.len() {
            let dirs = self
                .v1
                .iter()
                .map(|(c, base)| (Some(*c), base.join(group).join(name)))
                .collect();
            return Ok((Version::V1, dirs));
        }
        Err(CgroupError::Unavailable(format!(
            "it needs cgroup2 with the memory, cpu and pids controllers, or their cgroup v1 \
             hierarchies; found {}",
            self.found
        )))
    }
}

/// A guest's cgroup, made by [`Cgroup::create`]; [`Cgroup::remove`] takes it away once its
/// processes are gone.
#[derive(Debug)]
pub struct Cgroup {
    version: Version,
    dirs: Vec<PathBuf>,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(io(&path))
}

impl Cgroup {
    /// Makes (or takes over, as it stands) guest `name`'s cgroup in `group` next to the
    /// calling process's own, and sets `limits` on it.
    pub fn create(group: &str, name: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        Cgroup::create_in(&Layout::of_this_process()?, group, name, limits)
    }

    /// As [`Cgroup::create`], in `layout`.
    pub fn create_in(
        layout: &Layout,
        group: &str,
        name: &str,
        limits: &Limits,
    ) -> Result<Cgroup, CgroupError> {
        let (version, dirs) = layout.dirs(group, name)?;
        for (controller, dir) in &dirs {
            let group = dir.parent().unwrap_or(dir);
            // The group goes with its last guest (see `remove`): one that vanishes between
            // the two mkdirs is made again.
            let mut tries = 0;
            loop {
                tries += 1;
                std::fs::create_dir_all(group).map_err(io(group))?;
                if version == Version::V2 {
                    // Both levels pass the controllers down; the caller's own cgroup is not one.
                    let base = group.parent().unwrap_or(group);
                    for d in [base, group] {
                        write(d, "cgroup.subtree_control", "+memory +cpu +pids")?;
                    }
                }
                match std::fs::create_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => {}
                    Err(e) => return Err(io(dir)(e)),
                }
            }
            let cpu = format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us);
            match controller {
                None => {
                    write(dir, "memory.max", &limits.memory_bytes.to_string())?;
                    // No swap: a guest's memory is what the limit says.
                    let _ = write(dir, "memory.swap.max", "0");
                    write(dir, "cpu.max", &cpu)?;
                    write(dir, "pids.max", &limits.pids.to_string())?;
                }
                Some("memory") => write(
                    dir,
                    "memory.limit_in_bytes",
                    &limits.memory_bytes.to_string(),
                )?,
                Some("cpu") => {
                    write(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    write(dir, "cpu.cfs_quota_us", &limits.cpu_quota_us.to_string())?;
                }
                Some(_) => write(dir, "pids.max", &limits.pids.to_string())?,
            }
        }
        Ok(Cgroup {
            version,
            dirs: dirs.into_iter().map(|(_, d)| d).collect(),
        })
    }

    /// Its version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Its directory (v2) or directories (v1: memory, cpu, pids).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The pids in it (in its first directory).
    pub fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dirs[0].join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// What a spawn needs to start a process in it: the v2 directory (for
    /// `CLONE_INTO_CGROUP`), or each v1 `cgroup.procs` (which the child writes itself into).
    pub(crate) fn placement(&self) -> Result<Placement, CgroupError> {
        match self.version {
            Version::V2 => {
                let dir = &self.dirs[0];
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY)
                    .open(dir)
                    .map_err(io(dir))?;
                Ok(Placement::V2(f))
            }
            Version::V1 => self
                .dirs
                .iter()
                .map(|d| {
                    let procs = d.join("cgroup.procs");
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&procs)
                        .map_err(io(&procs))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Placement::V1),
        }
    }

    /// Removes the cgroup; its processes must have ended. A process that has just exited may
    /// hold it for a moment, so a busy cgroup is tried again for up to a second.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(16) && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => return Err(io(dir)(e)),
                }
            }
            // The group too, if this was its last guest (another's keeps it: ENOTEMPTY/EBUSY).
            if let Some(group) = dir.parent() {
                let _ = std::fs::remove_dir(group);
            }
        }
        Ok(())
    }

    /// Guest `name`'s cgroup as [`Cgroup::create`] would make it, without making or changing
    /// anything: for removing what an earlier run left.
    pub fn existing(group: &str, name: &str) -> Result<Cgroup, CgroupError> {
        let (version, dirs) = Layout::of_this_process()?.dirs(group, name)?;
        Ok(Cgroup {
            version,
            dirs: dirs.into_iter().map(|(_, d)| d).collect(),
        })
    }
}

/// How a new process enters a cgroup (see [`Cgroup::placement`]).
#[derive(Debug)]
pub(crate) enum Placement {
    /// The cgroup v2 directory, open.
    V2(File),
    /// Each v1 hierarchy's `cgroup.procs`, open for writing.
    V1(Vec<File>),
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
8:pids:/
4:memory:/process_api/f437
1:cpu:/
0::/
";

    #[test]
    fn v2_with_the_controllers_puts_guests_beside_the_callers_cgroup() {
        let mountinfo = "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
                         30 27 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let layout = Layout::parse(mountinfo, "0::/hvnode/agent\n", |d| {
            assert_eq!(d, Path::new("/sys/fs/cgroup/hvnode"));
            "cpuset cpu io memory pids\n".into()
        });
        let (version, dirs) = layout.dirs(GUESTS, "web").unwrap();
        assert_eq!(version, Version::V2);
        assert_eq!(
            dirs,
            vec![(None, PathBuf::from("/sys/fs/cgroup/hvnode/guests/web"))]
        );
        // In the root cgroup: guests go in the root.
        let layout = Layout::parse(mountinfo, "0::/\n", |_| "memory cpu pids".into());
        assert_eq!(
            layout.dirs(GUESTS, "web").unwrap().1[0].1,
            Path::new("/sys/fs/cgroup/guests/web")
        );
    }

    #[test]
    fn v2_without_the_controllers_falls_back_to_the_v1_hierarchies() {
        let layout = Layout::parse(HYBRID, HYBRID_CGROUP, |_| "hugetlb\n".into());
        let (version, dirs) = layout.dirs(GUESTS, "web").unwrap();
        assert_eq!(version, Version::V1);
        assert_eq!(
            dirs,
            vec![
                (
                    Some("memory"),
                    PathBuf::from("/sys/fs/cgroup/memory/process_api/guests/web")
                ),
                (Some("cpu"), PathBuf::from("/sys/fs/cgroup/cpu/guests/web")),
                (
                    Some("pids"),
                    PathBuf::from("/sys/fs/cgroup/pids/guests/web")
                ),
            ]
        );
    }

    #[test]
    fn no_usable_hierarchy_is_an_error_saying_what_was_found() {
        let only_v2 = "41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let layout = Layout::parse(only_v2, "0::/\n", |_| "hugetlb".into());
        let e = layout.dirs(GUESTS, "web").unwrap_err().to_string();
        assert!(
            e.contains("cgroup2 at /sys/fs/cgroup with controllers [hugetlb]"),
            "{e}"
        );
        let e = Layout::parse("", "", |_| String::new())
            .dirs(GUESTS, "web")
            .unwrap_err();
        assert!(
            e.to_string().contains("no cgroup filesystem mounted"),
            "{e}"
        );
    }

    #[test]
    fn limits_land_in_the_files_of_each_version() {
        let root = std::env::temp_dir().join(format!("hvnode-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let limits = Limits {
            memory_bytes: 192 << 20,
            cpu_quota_us: 150_000,
            pids: 66,
        };
        let v2 = Layout {
            v2: Some(root.join("v2/hvnode")),
            v1: Vec::new(),
            found: String::new(),
        };
        let cg = Cgroup::create_in(&v2, GUESTS, "web", &limits).unwrap();
        let read = |p: &Path, f: &str| std::fs::read_to_string(p.join(f)).unwrap();
        let dir = root.join("v2/hvnode/guests/web");
        assert_eq!(cg.dirs(), std::slice::from_ref(&dir));
        assert_eq!(read(&dir, "memory.max"), (192u64 << 20).to_string());
        assert_eq!(read(&dir, "cpu.max"), "150000 100000");
        assert_eq!(read(&dir, "pids.max"), "66");
        assert_eq!(
            read(&root.join("v2/hvnode/guests"), "cgroup.subtree_control"),
            "+memory +cpu +pids"
        );
        let v1 = Layout {
            v2: None,
            v1: CONTROLLERS.iter().map(|c| (*c, root.join(c))).collect(),
            found: String::new(),
        };
        Cgroup::create_in(&v1, GUESTS, "web", &limits).unwrap();
        assert_eq!(
            read(&root.join("memory/guests/web"), "memory.limit_in_bytes"),
            (192u64 << 20).to_string()
        );
        assert_eq!(
            read(&root.join("cpu/guests/web"), "cpu.cfs_quota_us"),
            "150000"
        );
        assert_eq!(
            read(&root.join("cpu/guests/web"), "cpu.cfs_period_us"),
            "100000"
        );
        assert_eq!(read(&root.join("pids/guests/web"), "pids.max"), "66");
        for bad in ["", "a/b", ".."] {
            assert!(
                Cgroup::create_in(&v1, GUESTS, bad, &limits).is_err(),
                "{bad}"
            );
            assert!(
                Cgroup::create_in(&v1, bad, "web", &limits).is_err(),
                "{bad}"
            );
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
