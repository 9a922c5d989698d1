//! The Storage screen: the data partition (or the warning that state is volatile) and the blank
//! disks; `i` initialises one after the admin typed its device name. Installing to disk: the
//! disks with what an install does to each, `n` installs onto one after the admin typed its name
//! (the confirmation), and the progress.

use hvnode_api::units::bytes;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::text::Line;

use super::{kv, Reaction};
use hvnode_api::install::InstallState;

use crate::state::{Action, Field, FieldKind, Snapshot};

/// The screen's keys.
pub fn on_key(key: KeyEvent) -> Reaction {
    match key.code {
        KeyCode::Char('i') => Reaction::Edit(Field::new(
            FieldKind::StorageDevice,
            "Type the blank disk's device to initialise (e.g. /dev/sdb)",
            String::new(),
        )),
        KeyCode::Char('n') => Reaction::Edit(Field::new(
            FieldKind::InstallDisk,
            "Install onto (ERASES it; an hvnode data partition is kept), type e.g. /dev/sdb",
            String::new(),
        )),
        _ => Reaction::Nothing,
    }
}

/// The screen's lines.
pub fn lines(d: &Snapshot) -> Vec<Line<'static>> {
    let s = &d.storage.status;
    let mut l = if s.persistent {
        vec![
            kv("Data partition", s.device.clone().unwrap_or_default()),
            kv("Size", bytes(s.size_bytes)),
            kv("Free", bytes(s.free_bytes)),
        ]
    } else {
        vec![Line::raw(
            "No data partition: state is volatile and lost at reboot.",
        )]
    };
    if let Some(n) = &s.note {
        l.push(Line::raw(n.clone()));
    }
    l.push(Line::raw(""));
    l.push(Line::raw("Blank disks:"));
    for disk in &d.storage.blank_disks {
        l.push(Line::raw(format!(
            "  /dev/{} {} {}",
            disk.name,
            bytes(disk.size_bytes),
            disk.model
        )));
    }
    if d.storage.blank_disks.is_empty() {
        l.push(Line::raw("  none"));
    } else if !s.persistent {
        l.push(Line::raw(
            "i: initialise a blank disk as the data partition",
        ));
    }
    l.push(Line::raw(""));
    l.extend(install_lines(d));
    if !d.cluster.domains.is_empty() {
        l.push(Line::raw(""));
        l.push(Line::raw("Cluster storage domains:"));
        for dom in &d.cluster.domains {
            let h = &dom.here;
            let state = match (&h.error, h.healthy) {
                (Some(e), _) => format!("ERROR {e}"),
                (None, true) => format!(
                    "ok, {} free of {}",
                    bytes(h.free_bytes),
                    bytes(h.total_bytes)
                ),
                (None, false) => "not checked yet".to_owned(),
            };
            l.push(Line::raw(format!(
                "  {} {}:{} {state}",
                dom.name, dom.server, dom.export
            )));
        }
    }
    l
}

fn install_lines(d: &Snapshot) -> Vec<Line<'static>> {
    let mut l = vec![Line::raw("Install to disk:")];
    match &d.install {
        InstallState::Idle => {}
        InstallState::Writing {
            disk,
            stage,
            percent,
        } => l.push(Line::raw(format!(
            "  Installing onto {disk}: {stage} {percent}%"
        ))),
        InstallState::Done { disk } => l.push(Line::raw(format!(
            "  Installed on {disk}: power off, remove the medium, boot from {disk}"
        ))),
        InstallState::Failed { disk, error } => {
            l.push(Line::raw(format!("  Install onto {disk} FAILED: {error}")))
        }
    }
    for disk in &d.install_disks {
        let medium = if disk.boot_medium {
            " (boot medium)"
        } else {
            ""
        };
        l.push(Line::raw(format!(
            "  {} {} {}{medium}: {}",
            disk.name,
            bytes(disk.size_bytes),
            disk.model,
            disk.note
        )));
    }
    if d.install_disks.iter().any(|x| x.usable)
        && !matches!(d.install, InstallState::Writing { .. })
    {
        l.push(Line::raw(
            "n: install hvnode onto a disk (type its name to confirm)",
        ));
    }
    l
}

/// The install field's text checked: a whole disk under `/dev/`.
pub fn install_disk(v: String) -> Result<Action, String> {
    match device(v) {
        Ok(Action::InitStorage(d)) => Ok(Action::Install(d)),
        _ => Err("Type the disk's device such as /dev/sdb".into()),
    }
}

/// The device field's text checked: a whole disk under `/dev/`, nothing that climbs out of it.
pub fn device(v: String) -> Result<Action, String> {
    if v.starts_with("/dev/") && v.len() > 5 && !v.contains("..") {
        Ok(Action::InitStorage(v))
    } else {
        Err("Type a whole-disk device such as /dev/sdb".into())
    }
}

#[cfg(test)]
mod tests {
    use ratatui::crossterm::event::KeyCode;

    use super::device;
    use crate::state::Action;
    use crate::testing::{app, ctrl, key, render, typed};

    #[test]
    fn only_a_whole_disk_under_dev_is_taken() {
        assert_eq!(
            device("/dev/sdb".into()),
            Ok(Action::InitStorage("/dev/sdb".into()))
        );
        for bad in ["sdb", "/dev/", "/dev/../etc/passwd", "/tmp/disk"] {
            assert!(device(bad.into()).is_err(), "{bad}");
        }
    }

    #[test]
    fn i_asks_for_the_device_and_sends_it_once_it_checks() {
        let mut a = app();
        a.on_key(key(KeyCode::Char('5')));
        assert!(a.on_key(key(KeyCode::Char('i'))).is_empty());
        typed(&mut a, "sdb");
        assert!(a.on_key(key(KeyCode::Enter)).is_empty());
        let s = render(&a);
        assert!(
            s.contains("! Type a whole-disk device such as /dev/sdb"),
            "{s}"
        );
        a.on_key(ctrl('u'));
        typed(&mut a, "/dev/sdb");
        assert_eq!(
            a.on_key(key(KeyCode::Enter)),
            vec![Action::InitStorage("/dev/sdb".into())]
        );
    }

    #[test]
    fn install_lists_the_disks_asks_for_the_name_and_shows_progress() {
        use hvnode_api::install::{DiskContent, InstallDisk, InstallState};
        let mut snap = crate::testing::snapshot();
        snap.install_disks.push(InstallDisk {
            name: "/dev/vda".into(),
            size_bytes: 4 << 30,
            model: "QEMU".into(),
            content: DiskContent::Blank,
            boot_medium: false,
            usable: true,
            needs_confirm: false,
            note: "blank: the whole disk becomes hvnode's".into(),
        });
        let text: Vec<String> = super::lines(&snap).iter().map(|l| l.to_string()).collect();
        let text = text.join("\n");
        assert!(text.contains("/dev/vda 4.0 GiB QEMU: blank"), "{text}");
        assert!(text.contains("n: install hvnode"), "{text}");
        snap.install = InstallState::Writing {
            disk: "/dev/vda".into(),
            stage: "root".into(),
            percent: 40,
        };
        let text: Vec<String> = super::lines(&snap).iter().map(|l| l.to_string()).collect();
        assert!(
            text.iter()
                .any(|l| l.contains("Installing onto /dev/vda: root 40%")),
            "{text:?}"
        );
        assert!(!text.iter().any(|l| l.contains("n: install")));

        let mut a = app();
        a.on_key(key(KeyCode::Char('5')));
        assert!(a.on_key(key(KeyCode::Char('n'))).is_empty());
        typed(&mut a, "vda");
        assert!(a.on_key(key(KeyCode::Enter)).is_empty());
        a.on_key(ctrl('u'));
        typed(&mut a, "/dev/vda");
        assert_eq!(
            a.on_key(key(KeyCode::Enter)),
            vec![Action::Install("/dev/vda".into())]
        );
    }

    #[test]
    fn cluster_storage_domains_show_their_health() {
        use hvnode_api::cluster::{DomainHealth, DomainView};
        let mut snap = crate::testing::snapshot();
        for (name, here) in [
            (
                "shared",
                DomainHealth {
                    name: "shared".into(),
                    mounted: true,
                    healthy: true,
                    total_bytes: 100 << 30,
                    free_bytes: 40 << 30,
                    error: None,
                },
            ),
            (
                "gone",
                DomainHealth {
                    name: "gone".into(),
                    error: Some("the server does not answer".into()),
                    ..DomainHealth::default()
                },
            ),
        ] {
            snap.cluster.domains.push(DomainView {
                name: name.into(),
                server: "10.0.0.9".into(),
                export: "/vm".into(),
                nfs_version: "4.2".into(),
                options: String::new(),
                here,
            });
        }
        let text: Vec<String> = super::lines(&snap).iter().map(|l| l.to_string()).collect();
        let text = text.join("\n");
        assert!(
            text.contains("shared 10.0.0.9:/vm ok, 40.0 GiB free of 100.0 GiB"),
            "{text}"
        );
        assert!(
            text.contains("gone 10.0.0.9:/vm ERROR the server does not answer"),
            "{text}"
        );
    }
}
