//! The form's keys: Tab and the arrows move between the fields that apply, Space and the
//! arrows cycle the mode or the NIC, text keys edit the focused field, Enter/F10 submits only
//! a form that checks, Esc cancels. Every edit re-runs the checks so errors follow the typing.

use hvnode_api::config::{AddressMode, NetworkConfig};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::{index, FieldId, NetForm, FIELDS};

/// Longest text a field takes.
const MAX_LEN: usize = 64;

/// The form's answer to a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Still editing.
    Editing,
    /// Esc: close the form, send nothing.
    Cancel,
    /// Enter/F10 with every field valid: the configuration to apply.
    Submit(NetworkConfig),
}

impl NetForm {
    /// The next mode: DHCP and static, and for an interface form also off.
    fn cycle_mode(&mut self, forward: bool) {
        let modes: &[AddressMode] = match self.nic {
            Some(_) => &[AddressMode::Dhcp, AddressMode::Static, AddressMode::Manual],
            None => &[AddressMode::Dhcp, AddressMode::Static],
        };
        let n = modes.len();
        let i = modes.iter().position(|m| *m == self.mode).unwrap_or(0);
        self.mode = modes[if forward {
            (i + 1) % n
        } else {
            (i + n - 1) % n
        }];
    }

    fn move_focus(&mut self, forward: bool) {
        let n = FIELDS.len();
        let mut i = index(self.focus);
        for _ in 0..n {
            i = if forward {
                (i + 1) % n
            } else {
                (i + n - 1) % n
            };
            if self.active(FIELDS[i].0) {
                self.focus = FIELDS[i].0;
                return;
            }
        }
    }

    fn cycle_nic(&mut self, forward: bool) {
        if self.nics.is_empty() {
            return;
        }
        let cur = self.text(FieldId::Management).trim().to_owned();
        let n = self.nics.len();
        let next = match self.nics.iter().position(|x| *x == cur) {
            Some(i) if forward => (i + 1) % n,
            Some(i) => (i + n - 1) % n,
            None => 0,
        };
        self.text[index(FieldId::Management)] = self.nics[next].clone();
    }

    /// Handles a key.
    pub fn on_key(&mut self, key: KeyEvent) -> Outcome {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let i = index(self.focus);
        match key.code {
            KeyCode::Esc => return Outcome::Cancel,
            KeyCode::Enter | KeyCode::F(10) => match self.check() {
                Ok(config) => return Outcome::Submit(config),
                Err(errors) => {
                    if let Some(first) = errors.first() {
                        self.focus = first.field;
                    }
                    self.errors = errors;
                    self.refused = true;
                    return Outcome::Editing;
                }
            },
            KeyCode::Tab | KeyCode::Down => self.move_focus(true),
            KeyCode::BackTab | KeyCode::Up => self.move_focus(false),
            KeyCode::Left | KeyCode::Right | KeyCode::Char(' ') if self.focus == FieldId::Mode => {
                self.cycle_mode(key.code != KeyCode::Left)
            }
            KeyCode::Left | KeyCode::Right if self.focus == FieldId::Management => {
                self.cycle_nic(key.code == KeyCode::Right)
            }
            KeyCode::Char('d' | 'D') if self.focus == FieldId::Mode => {
                self.mode = AddressMode::Dhcp
            }
            KeyCode::Char('s' | 'S') if self.focus == FieldId::Mode => {
                self.mode = AddressMode::Static
            }
            KeyCode::Char('o' | 'O') if self.focus == FieldId::Mode && self.nic.is_some() => {
                self.mode = AddressMode::Manual
            }
            KeyCode::Backspace => {
                self.text[i].pop();
            }
            // Serial terminals send ^H for Backspace; ^U clears the field as in a shell.
            KeyCode::Char('h') if ctrl => {
                self.text[i].pop();
            }
            KeyCode::Char('u') if ctrl => self.text[i].clear(),
            KeyCode::Char(c)
                if !ctrl
                    && !key.modifiers.contains(KeyModifiers::ALT)
                    && self.focus != FieldId::Mode
                    && self.text[i].len() < MAX_LEN =>
            {
                self.text[i].push(c)
            }
            _ => return Outcome::Editing,
        }
        self.refused = false;
        self.errors = self.check().err().unwrap_or_default();
        Outcome::Editing
    }
}
