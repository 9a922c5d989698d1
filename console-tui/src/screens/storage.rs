//! The Storage screen: the data partition (or the warning that state is volatile) and the blank
//! disks; `i` initialises one after the admin typed its device name.

use hvnode_api::units::bytes;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use ratatui::text::Line;

use super::{kv, Reaction};
use crate::state::{Field, FieldKind, Snapshot};

/// The screen's keys.
pub fn on_key(key: KeyEvent) -> Reaction {
    match key.code {
        KeyCode::Char('i') => Reaction::Edit(Field::new(
            FieldKind::StorageDevice,
            "Type the blank disk's device to initialise (e.g. /dev/sdb)",
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
    l
}
