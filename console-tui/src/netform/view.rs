//! The form drawn as lines for the Network screen's body: each field with its value and its
//! error beside it, and a hint for the focused field.

use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};

use super::check::example;
use super::*;

impl NetForm {
    fn hint(&self) -> String {
        match self.focus {
            FieldId::Management => {
                let nics = if self.nics.is_empty() {
                    "none reported".to_owned()
                } else {
                    self.nics.join(" ")
                };
                format!("A NIC (Left/Right cycles), or a bond's name. NICs: {nics}")
            }
            FieldId::Bond => "NICs to bond, e.g. eth1 eth2; empty: no bond".into(),
            FieldId::Vlan if self.nic.is_some() => {
                "802.1Q id 1-4094; the NIC itself then gets no address".into()
            }
            FieldId::Vlan => "802.1Q id 1-4094 of the management network; empty: untagged".into(),
            FieldId::Mode if self.nic.is_some() => {
                "Space or Left/Right: DHCP, static or off (link up, no address)".into()
            }
            FieldId::Mode => "Space or Left/Right: DHCP or static".into(),
            FieldId::Ipv4 => format!("ADDRESS/PREFIX, e.g. {}", example(true)),
            FieldId::Ipv6 => format!("ADDRESS/PREFIX, e.g. {}; empty: none", example(false)),
            FieldId::Gateway4 | FieldId::Gateway6 if self.nic.is_some() => {
                "Optional, in the address's subnet; a storage network needs none".into()
            }
            FieldId::Gateway4 | FieldId::Gateway6 => {
                "Default gateway, in the address's subnet; empty: none".into()
            }
            FieldId::Dns => "Comma-separated; empty: use DNS from DHCP".into(),
            FieldId::Bridge => "Guests' taps join it; empty: no bridge".into(),
            FieldId::Mtu => "68-9216, e.g. 9000 for jumbo frames; empty: the kernel's".into(),
        }
    }

    /// The form's lines for the body of the Network screen (at most 17).
    pub fn lines(&self) -> Vec<Line<'static>> {
        let what = match &self.nic {
            Some(nic) => format!("Interface {nic}"),
            None => "Management network".to_owned(),
        };
        let mut l = vec![
            Line::raw(format!("{what}: these settings apply to {}", self.device())),
            Line::raw(""),
        ];
        for (f, label) in FIELDS.into_iter().filter(|(f, _)| self.shows(*f)) {
            let focused = self.focus == f;
            let value = if f == FieldId::Mode {
                match self.mode {
                    AddressMode::Dhcp => "< DHCP >",
                    AddressMode::Static => "< static >",
                    AddressMode::Manual => "< off >",
                }
                .to_owned()
            } else if !self.active(f) {
                if self.mode == AddressMode::Manual {
                    "(none)".to_owned()
                } else {
                    "(from DHCP)".to_owned()
                }
            } else {
                // The focused field shows its end, where the cursor is; others their start.
                let mut v = self.text(f).to_owned();
                if focused {
                    v.push('_');
                    let skip = v.chars().count().saturating_sub(VALUE_WIDTH);
                    v.chars().skip(skip).collect()
                } else {
                    v.chars().take(VALUE_WIDTH).collect()
                }
            };
            let value_style = if focused {
                Style::default().add_modifier(Modifier::REVERSED)
            } else if !self.active(f) {
                Style::default().add_modifier(Modifier::DIM)
            } else {
                Style::default()
            };
            let mut spans = vec![
                Span::raw(format!("{}{label:<14} ", if focused { '>' } else { ' ' })),
                Span::styled(format!("{value:<VALUE_WIDTH$}"), value_style),
            ];
            if let Some(e) = self.error(f).filter(|_| self.active(f)) {
                spans.push(Span::styled(
                    format!(" ! {e}"),
                    Style::default().add_modifier(Modifier::BOLD),
                ));
            }
            l.push(Line::from(spans));
        }
        l.push(Line::raw(""));
        l.push(Line::raw(if self.refused {
            format!(
                "Not sent: {} field(s) invalid. Fix the fields marked !",
                self.errors.len()
            )
        } else {
            self.hint()
        }));
        l.push(Line::raw(
            "An applied change rolls back after 60 s unless you press c to keep it.",
        ));
        l
    }
}
