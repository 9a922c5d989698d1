//! Installing the node onto a disk from the live medium it runs from (`GET /v1/node/disks`,
//! `POST /v1/node/install`, `GET /v1/node/install`). The checks and the writing are
//! `hvnode_update::install`'s; this module finds the disks and the sources, runs the install on
//! a blocking thread and keeps its progress. See docs/install.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use hvnode_api::error::ErrorCode;
use hvnode_api::install::{DiskContent, InstallDisk, InstallRequest, InstallState};
use hvnode_api::paths::DATA_LABEL;
use hvnode_update::disk;
use hvnode_update::install::{
    self as inst, short_name, BootFiles, InstallError, TargetDisk, BOOT_FILES_DIR,
};
use hvnode_update::slot::SlotSources;
use hyper::StatusCode;

use crate::error::{blocking, Error};
use crate::http::{json_response, Resp};
use crate::Agent;

const MKFS: &str = "/usr/sbin/mkfs.ext4";

/// The install's progress; one install at a time.
#[derive(Debug)]
pub struct Installer {
    state: Arc<Mutex<InstallState>>,
}

impl Default for Installer {
    fn default() -> Self {
        Installer {
            state: Arc::new(Mutex::new(InstallState::Idle)),
        }
    }
}

impl Installer {
    fn get(&self) -> InstallState {
        self.state
            .lock()
            .map(|s| s.clone())
            .unwrap_or(InstallState::Idle)
    }
}

fn read_attr(path: PathBuf) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The whole disk holding the live medium mounted at `media`, if one is.
fn boot_medium_disk(media: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let source = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (src, target) = (f.next()?, f.next()?);
        (Path::new(target) == media).then(|| src.to_owned())
    })?;
    let name = short_name(&source).to_owned();
    let sys = Path::new("/sys/class/block").join(&name);
    if sys.join("partition").exists() {
        let parent = std::fs::canonicalize(&sys).ok()?.parent()?.to_path_buf();
        return Some(parent.file_name()?.to_string_lossy().into_owned());
    }
    Some(name)
}

fn skipped(name: &str) -> bool {
    ["loop", "ram", "zram", "dm-", "sr", "md", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// What an install needs to know about `/dev/<name>`; `None` if there is no such whole disk.
fn target_disk(name: &str, boot_medium: Option<&str>) -> Option<(TargetDisk, String)> {
    if skipped(name) || name.is_empty() {
        return None;
    }
    let sys = Path::new("/sys/block").join(name);
    if !sys.exists() {
        return None;
    }
    let device = format!("/dev/{name}");
    let size = read_attr(sys.join("size")).parse::<u64>().unwrap_or(0) * 512;
    let sector = read_attr(sys.join("queue/logical_block_size"))
        .parse::<u64>()
        .unwrap_or(512);
    let content = std::fs::File::open(&device)
        .ok()
        .filter(|_| size > 0)
        .and_then(|f| disk::classify(&f, size, sector).ok())
        .unwrap_or(disk::DiskContent::Foreign);
    Some((
        TargetDisk {
            device,
            size_bytes: size,
            sector,
            content,
            boot_medium: boot_medium == Some(name),
            read_only: read_attr(sys.join("ro")) == "1",
        },
        read_attr(sys.join("device/model")),
    ))
}

fn api_content(c: &disk::DiskContent) -> DiskContent {
    match c {
        disk::DiskContent::Blank => DiskContent::Blank,
        disk::DiskContent::Hvnode { .. } => DiskContent::Hvnode,
        disk::DiskContent::HvnodeData => DiskContent::HvnodeData,
        disk::DiskContent::Foreign => DiskContent::Foreign,
    }
}

/// The API's view of a disk: whether and how it can be installed onto, in words.
pub fn describe(t: &TargetDisk, model: String) -> InstallDisk {
    let plain = inst::plan(t, None);
    let confirmed = inst::plan(t, Some(&t.device));
    let note = match (&plain, &confirmed) {
        (Ok(p), _) if p.keep_data.is_some() => {
            "hvnode is installed: slots and boot files are rewritten, the data partition is kept"
                .to_owned()
        }
        (Ok(_), _) if t.content == disk::DiskContent::Blank => {
            "blank: the whole disk becomes hvnode's, with a new data partition".to_owned()
        }
        (Ok(_), _) => "everything on the disk is erased, a new data partition is made".to_owned(),
        (Err(e), Ok(_)) => format!("{e}; everything on it is erased"),
        (Err(_), Err(e)) => e.to_string(),
    };
    InstallDisk {
        name: t.device.clone(),
        size_bytes: t.size_bytes,
        model,
        content: api_content(&t.content),
        boot_medium: t.boot_medium,
        usable: confirmed.is_ok(),
        needs_confirm: plain.is_err() && confirmed.is_ok(),
        note,
    }
}

fn install_error(e: &InstallError) -> Error {
    let code = if e.needs_confirmation() {
        ErrorCode::ConfirmationRequired
    } else if e.is_invalid_request() {
        ErrorCode::InvalidInstallTarget
    } else {
        ErrorCode::Internal
    };
    Error::new(code, chain(e))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// mkfs.ext4 on the data partition's range of the whole disk (the partition table that names
/// it is written after: docs/install.md).
fn format_data(device: &str, extent: disk::Extent) -> std::io::Result<()> {
    let out = Command::new(MKFS)
        .args(["-F", "-q", "-L", DATA_LABEL, "-E"])
        .arg(format!("offset={},nodiscard", extent.offset))
        .arg(device)
        .arg(format!("{}k", extent.len / 1024))
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "mkfs.ext4 failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

impl Agent {
    fn media_dir(&self) -> PathBuf {
        self.paths.run.join("media")
    }

    /// `GET /v1/node/disks`: every whole disk, what is on it and what an install would do.
    pub(crate) async fn install_disks(&self) -> Result<Resp, Error> {
        let media = self.media_dir();
        let disks = blocking("Install", move || {
            let boot = boot_medium_disk(&media);
            let mut names: Vec<String> = std::fs::read_dir("/sys/block")
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            Ok(names
                .iter()
                .filter_map(|n| target_disk(n, boot.as_deref()))
                .map(|(t, model)| describe(&t, model))
                .collect::<Vec<_>>())
        })
        .await?;
        Ok(json_response(StatusCode::OK, &disks))
    }

    /// `GET /v1/node/install`.
    pub(crate) fn install_state(&self) -> Resp {
        json_response(StatusCode::OK, &self.install.get())
    }

    /// `POST /v1/node/install`: checks the request, then writes the disk in the background;
    /// `GET /v1/node/install` follows it.
    pub(crate) async fn start_install(
        self: &Arc<Self>,
        req: InstallRequest,
    ) -> Result<Resp, Error> {
        req.validate()
            .map_err(|m| Error::new(ErrorCode::InvalidInstallRequest, m))?;
        if matches!(self.install.get(), InstallState::Writing { .. }) {
            return Err(Error::new(
                ErrorCode::InstallInProgress,
                "An install is running; follow it with GET /v1/node/install",
            ));
        }
        let media = self.media_dir();
        let sources = SlotSources::live_medium(&media);
        let boot = BootFiles::in_dir(Path::new(BOOT_FILES_DIR));
        for p in [
            &sources.root,
            &sources.verity,
            &sources.kernel,
            &sources.initrd,
        ] {
            if !p.is_file() {
                return Err(Error::new(
                    ErrorCode::NoInstallSource,
                    format!("{} is missing: installing works only while the node runs from its live medium (the ISO)", p.display()),
                ));
            }
        }
        for p in [&boot.efi, &boot.core_img, &boot.boot_img] {
            if !p.is_file() {
                return Err(Error::new(
                    ErrorCode::NoInstallSource,
                    format!(
                        "{} is missing: this image cannot install to disk",
                        p.display()
                    ),
                ));
            }
        }
        let name = short_name(&req.disk).to_owned();
        let confirm = req.confirm.clone();
        let media_c = media;
        let plan = blocking("Install", move || {
            let boot_disk = boot_medium_disk(&media_c);
            let (target, _) = target_disk(&name, boot_disk.as_deref()).ok_or_else(|| {
                Error::new(
                    ErrorCode::DiskNotFound,
                    format!("/dev/{name} is not a whole disk of this node (GET /v1/node/disks lists them)"),
                )
            })?;
            inst::plan(&target, confirm.as_deref()).map_err(|e| install_error(&e))
        })
        .await?;
        let device = plan.device.clone();
        let writing = InstallState::Writing {
            disk: device.clone(),
            stage: inst::Stage::Preparing.name().to_owned(),
            percent: 0,
        };
        {
            let mut st = self
                .install
                .state
                .lock()
                .map_err(|_| Error::new(ErrorCode::Internal, "Install state poisoned"))?;
            if matches!(*st, InstallState::Writing { .. }) {
                return Err(Error::new(
                    ErrorCode::InstallInProgress,
                    "An install is running; follow it with GET /v1/node/install",
                ));
            }
            *st = writing.clone();
        }
        let state = Arc::clone(&self.install.state);
        tokio::task::spawn_blocking(move || {
            let set = |s: InstallState| {
                if let Ok(mut st) = state.lock() {
                    *st = s;
                }
            };
            let result = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&device)
                .map_err(|e| InstallError::Disk(device.clone(), disk::DiskError::Io(e)))
                .and_then(|file| {
                    inst::install(
                        &file,
                        &plan,
                        &sources,
                        &boot,
                        &mut |_, extent| format_data(&device, extent),
                        &mut |stage, percent| {
                            set(InstallState::Writing {
                                disk: device.clone(),
                                stage: stage.name().to_owned(),
                                percent,
                            })
                        },
                    )
                });
            set(match result {
                Ok(()) => InstallState::Done {
                    disk: device.clone(),
                },
                Err(e) => InstallState::Failed {
                    disk: device.clone(),
                    error: chain(&e),
                },
            });
        });
        Ok(json_response(StatusCode::ACCEPTED, &writing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(content: disk::DiskContent) -> TargetDisk {
        TargetDisk {
            device: "/dev/vdb".into(),
            size_bytes: 4 << 30,
            sector: 512,
            content,
            boot_medium: false,
            read_only: false,
        }
    }

    #[test]
    fn blank_disks_need_no_confirmation_and_foreign_ones_do() {
        let d = describe(&t(disk::DiskContent::Blank), "QEMU".into());
        assert!(d.usable && !d.needs_confirm, "{d:?}");
        assert_eq!(d.content, DiskContent::Blank);
        let d = describe(&t(disk::DiskContent::Foreign), String::new());
        assert!(d.usable && d.needs_confirm, "{d:?}");
        assert!(d.note.contains("erase"), "{}", d.note);
        let mut small = t(disk::DiskContent::Blank);
        small.size_bytes = 1 << 30;
        let d = describe(&small, String::new());
        assert!(!d.usable && !d.needs_confirm, "{d:?}");
    }

    #[test]
    fn refusals_map_to_409_and_422() {
        let mut boot = t(disk::DiskContent::Foreign);
        boot.boot_medium = true;
        let e = install_error(&inst::plan(&boot, None).expect_err("boot medium"));
        assert_eq!(e.code, ErrorCode::ConfirmationRequired);
        let e = install_error(&inst::plan(&boot, Some("sda")).expect_err("mismatch"));
        assert_eq!(e.code, ErrorCode::InvalidInstallTarget);
    }
}
