//! The A/B slot state machine, kept in GRUB's environment block with RAUC's variables.
//!
//! `ORDER` lists the slots in the order GRUB tries them (`"A B"`); `<slot>_OK` is 1 while a slot
//! may be booted; `<slot>_TRY` is 1 once GRUB has started the slot and nobody has confirmed since.
//! At every boot GRUB ([`GRUB_SCRIPT`], `image/grub-ab.cfg`) takes the first slot of `ORDER` with
//! `OK=1`: if its `TRY` is still set, the last start of that slot never got as far as
//! [`AbState::mark_good`], so GRUB sets its `OK=0` and goes on to the next slot; otherwise it sets
//! `TRY=1`, saves the block and boots it. The running system confirms with `mark_good`, which
//! clears `TRY`. A new slot therefore gets exactly one attempt, and a failed attempt falls back to
//! the old slot with no one at the console.
//!
//! Our own variable `HVNODE_PENDING` names the slot an update was installed to until the update
//! is confirmed or rolled back, so that the node can say "the update failed" after GRUB fell back
//! ([`AbState::update_status`]).

use crate::grubenv::{self, GrubEnv};

/// GRUB's side of the scheme: include it from `grub.cfg`, then boot `$hvnode_slot`.
pub const GRUB_SCRIPT: &str = include_str!("../../image/grub-ab.cfg");

/// The variable naming the slot an unconfirmed update went to.
pub const PENDING: &str = "HVNODE_PENDING";

/// One of the two root slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// Both slots, in name order.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The slot's name in `ORDER` and in the variable names.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `A` or `B`, nothing else.
    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "A" => Some(Slot::A),
            "B" => Some(Slot::B),
            _ => None,
        }
    }

    fn ok_var(self) -> &'static str {
        match self {
            Slot::A => "A_OK",
            Slot::B => "B_OK",
        }
    }

    fn try_var(self) -> &'static str {
        match self {
            Slot::A => "A_TRY",
            Slot::B => "B_TRY",
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the slot state could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ORDER is {0:?}; it must name A and B once each")]
    Order(String),
    #[error("{name} is {value:?}; it must be 0 or 1")]
    Flag { name: &'static str, value: String },
    #[error("{name} is {value:?}; it must be a number")]
    Try { name: &'static str, value: String },
    #[error("{PENDING} is {0:?}; it must be A or B")]
    Pending(String),
    #[error("Cannot roll back: slot {0} is not marked bootable")]
    NoRollback(Slot),
    #[error(transparent)]
    Env(#[from] grubenv::Error),
}

/// Whether an installed update took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateStatus {
    /// No update is waiting for confirmation.
    None,
    /// The update in this slot is running and not confirmed yet.
    Trying(Slot),
    /// The update was installed to this slot, but the node runs the other one: the new slot
    /// failed to boot or to confirm (GRUB fell back), or was marked bad.
    Failed(Slot),
}

/// What GRUB decided at one boot ([`AbState::grub_boot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootChoice {
    /// The slot booted.
    pub slot: Slot,
    /// No slot was bootable; GRUB booted the first one that was marked OK when it started (or
    /// the first of `ORDER` if none was) rather than none.
    pub fallback: bool,
}

/// The slot state of one environment block. Variables it does not know are kept as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbState {
    env: GrubEnv,
}

impl AbState {
    /// The state of a freshly installed node: `slot` holds the installed system and is good,
    /// the other slot is empty.
    pub fn installed(slot: Slot) -> Self {
        let mut s = AbState {
            env: GrubEnv::new(),
        };
        s.set_order([slot, slot.other()]);
        s.set_flags(slot, true, 0);
        s.set_flags(slot.other(), false, 0);
        s
    }

    /// The slot state in `env`, checked: a block GRUB or we could not have written is refused
    /// rather than guessed at.
    pub fn from_env(env: GrubEnv) -> Result<Self, Error> {
        let s = AbState { env };
        s.order()?;
        for slot in Slot::ALL {
            s.ok(slot)?;
            s.tries(slot)?;
        }
        s.pending()?;
        Ok(s)
    }

    /// Reads the slot state from the environment block at `path`.
    pub fn load(path: &std::path::Path) -> Result<Self, Error> {
        Self::from_env(GrubEnv::load(path)?)
    }

    /// Writes the slot state back to `path`, atomically.
    pub fn store(&self, path: &std::path::Path) -> Result<(), Error> {
        Ok(self.env.store(path)?)
    }

    /// The environment block to write back.
    pub fn env(&self) -> &GrubEnv {
        &self.env
    }

    /// The order GRUB tries the slots in. A missing `ORDER` is GRUB's default, `A B`.
    pub fn order(&self) -> Result<[Slot; 2], Error> {
        let raw = self.env.get("ORDER").unwrap_or("A B");
        let slots: Vec<Option<Slot>> = raw.split_whitespace().map(Slot::parse).collect();
        match slots.as_slice() {
            [Some(a), Some(b)] if a != b => Ok([*a, *b]),
            _ => Err(Error::Order(raw.to_owned())),
        }
    }

    /// Whether `slot` may be booted (`<slot>_OK=1`). Missing means no.
    pub fn ok(&self, slot: Slot) -> Result<bool, Error> {
        match self.env.get(slot.ok_var()) {
            None | Some("0") => Ok(false),
            Some("1") => Ok(true),
            Some(v) => Err(Error::Flag {
                name: slot.ok_var(),
                value: v.to_owned(),
            }),
        }
    }

    /// `<slot>_TRY`: nonzero once GRUB started the slot and nobody confirmed. Missing means 0.
    pub fn tries(&self, slot: Slot) -> Result<u32, Error> {
        match self.env.get(slot.try_var()) {
            None => Ok(0),
            Some(v) => v.parse().map_err(|_| Error::Try {
                name: slot.try_var(),
                value: v.to_owned(),
            }),
        }
    }

    /// The slot an unconfirmed update went to.
    pub fn pending(&self) -> Result<Option<Slot>, Error> {
        match self.env.get(PENDING) {
            None => Ok(None),
            Some(v) => Slot::parse(v)
                .map(Some)
                .ok_or_else(|| Error::Pending(v.to_owned())),
        }
    }

    /// The slot GRUB will boot next (if nothing fails): the first of `ORDER` marked OK.
    pub fn active(&self) -> Result<Option<Slot>, Error> {
        for slot in self.order()? {
            if self.ok(slot)? {
                return Ok(Some(slot));
            }
        }
        Ok(None)
    }

    /// After an update was written to `slot`: boot it next, once. If it does not reach
    /// [`mark_good`](Self::mark_good), GRUB falls back to the other slot at the next boot.
    pub fn mark_try_once(&mut self, slot: Slot) -> Result<(), Error> {
        self.set_order([slot, slot.other()]);
        self.set_flags(slot, true, 0);
        self.env.set(PENDING, slot.name())?;
        Ok(())
    }

    /// The running system, booted from `booted`, works: keep booting it. Confirms a pending
    /// update in this slot.
    pub fn mark_good(&mut self, booted: Slot) -> Result<(), Error> {
        self.set_flags(booted, true, 0);
        if self.pending()? == Some(booted) {
            self.env.remove(PENDING);
        }
        Ok(())
    }

    /// `slot` must not be booted again (a failed write, a check that failed after boot). Its
    /// pending update, if any, stays recorded as failed.
    pub fn mark_bad(&mut self, slot: Slot) -> Result<(), Error> {
        let [first, second] = self.order()?;
        if first == slot {
            self.set_order([second, first]);
        }
        self.set_flags(slot, false, 0);
        Ok(())
    }

    /// The admin's manual rollback from the running slot `booted`: boot the other slot next, if
    /// it holds a system that was good. The running slot stays bootable, as the way back.
    pub fn rollback(&mut self, booted: Slot) -> Result<Slot, Error> {
        let target = booted.other();
        if !self.ok(target)? {
            return Err(Error::NoRollback(target));
        }
        self.set_order([target, booted]);
        self.set_flags(target, true, 0);
        self.env.remove(PENDING);
        Ok(target)
    }

    /// Whether the update recorded in `HVNODE_PENDING` took, seen from the slot that runs.
    pub fn update_status(&self, booted: Slot) -> Result<UpdateStatus, Error> {
        Ok(match self.pending()? {
            None => UpdateStatus::None,
            Some(p) if p == booted && self.ok(p)? => UpdateStatus::Trying(p),
            Some(p) => UpdateStatus::Failed(p),
        })
    }

    /// What GRUB does at boot with this block, step for step as in [`GRUB_SCRIPT`]: the tests
    /// drive the state machine through boots with it.
    pub fn grub_boot(&mut self) -> Result<BootChoice, Error> {
        let order = self.order()?;
        let mut first_ok = None;
        let mut chosen = None;
        for slot in order {
            if chosen.is_some() || !self.ok(slot)? {
                continue;
            }
            first_ok.get_or_insert(slot);
            if self.tries(slot)? == 0 {
                self.set_flags(slot, true, 1);
                chosen = Some(slot);
            } else {
                self.set_flags(slot, false, self.tries(slot)?);
            }
        }
        Ok(match chosen {
            Some(slot) => BootChoice {
                slot,
                fallback: false,
            },
            None => BootChoice {
                slot: first_ok.unwrap_or(order[0]),
                fallback: true,
            },
        })
    }

    fn set_order(&mut self, order: [Slot; 2]) {
        self.set_known("ORDER", &format!("{} {}", order[0], order[1]));
    }

    fn set_flags(&mut self, slot: Slot, ok: bool, tries: u32) {
        self.set_known(slot.ok_var(), if ok { "1" } else { "0" });
        self.set_known(slot.try_var(), &tries.to_string());
    }

    fn set_known(&mut self, name: &str, value: &str) {
        // Our five variables take well under 100 of the block's 999 bytes; only a block already
        // crammed with other variables could refuse them, and then GRUB's own save_env would
        // fail on it too.
        if let Err(e) = self.env.set(name, value) {
            debug_assert!(false, "{name}={value}: {e}");
        }
    }
}

/// The slot the running system was booted from, from the kernel command line (`hvnode.slot=`,
/// which the GRUB entries pass).
pub fn booted_from_cmdline(cmdline: &str) -> Option<Slot> {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("hvnode.slot="))
        .and_then(Slot::parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reload(s: &AbState) -> AbState {
        let block = s.env().to_bytes().unwrap();
        AbState::from_env(GrubEnv::parse(&block).unwrap()).unwrap()
    }

    /// One boot: GRUB decides and saves its block, then (if `works`) the booted system
    /// confirms. Every step goes through the 1024-byte block, as on a node.
    fn boot(s: &mut AbState, works: bool) -> BootChoice {
        *s = reload(s);
        let choice = s.grub_boot().unwrap();
        *s = reload(s);
        if works {
            s.mark_good(choice.slot).unwrap();
        }
        choice
    }

    #[test]
    fn fresh_install_boots_the_installed_slot_every_time() {
        let mut s = AbState::installed(Slot::A);
        for _ in 0..3 {
            assert_eq!(boot(&mut s, true).slot, Slot::A);
        }
        assert_eq!(s.update_status(Slot::A).unwrap(), UpdateStatus::None);
        assert_eq!(s.tries(Slot::A).unwrap(), 0);
        assert!(!s.ok(Slot::B).unwrap());
    }

    #[test]
    fn grub_sets_try_and_mark_good_clears_it() {
        let mut s = AbState::installed(Slot::A);
        let c = s.grub_boot().unwrap();
        assert_eq!(
            c,
            BootChoice {
                slot: Slot::A,
                fallback: false
            }
        );
        assert_eq!(s.tries(Slot::A).unwrap(), 1);
        s.mark_good(Slot::A).unwrap();
        assert_eq!(s.tries(Slot::A).unwrap(), 0);
        assert!(s.ok(Slot::A).unwrap());
    }

    #[test]
    fn mark_try_once_puts_the_slot_first_with_ok_and_no_tries() {
        let mut s = AbState::installed(Slot::A);
        s.mark_try_once(Slot::B).unwrap();
        assert_eq!(s.order().unwrap(), [Slot::B, Slot::A]);
        assert!(s.ok(Slot::B).unwrap());
        assert_eq!(s.tries(Slot::B).unwrap(), 0);
        assert_eq!(s.pending().unwrap(), Some(Slot::B));
        assert_eq!(s.active().unwrap(), Some(Slot::B));
        // The old slot stays as it was: the way back.
        assert!(s.ok(Slot::A).unwrap());
    }

    #[test]
    fn update_that_boots_and_confirms_becomes_the_system() {
        let mut s = AbState::installed(Slot::A);
        boot(&mut s, true);
        s.mark_try_once(Slot::B).unwrap();
        let c = boot(&mut s, false);
        assert_eq!(c.slot, Slot::B);
        assert_eq!(
            s.update_status(Slot::B).unwrap(),
            UpdateStatus::Trying(Slot::B)
        );
        s.mark_good(Slot::B).unwrap();
        assert_eq!(s.update_status(Slot::B).unwrap(), UpdateStatus::None);
        for _ in 0..3 {
            assert_eq!(boot(&mut s, true).slot, Slot::B);
        }
        assert_eq!(s.order().unwrap(), [Slot::B, Slot::A]);
    }

    #[test]
    fn new_slot_that_fails_falls_back_to_the_old_one_and_says_the_update_failed() {
        let mut s = AbState::installed(Slot::A);
        boot(&mut s, true);
        s.mark_try_once(Slot::B).unwrap();
        // The new system hangs or panics before it confirms; the watchdog or the admin resets.
        assert_eq!(boot(&mut s, false).slot, Slot::B);
        let c = boot(&mut s, true);
        assert_eq!(
            c,
            BootChoice {
                slot: Slot::A,
                fallback: false
            }
        );
        assert!(!s.ok(Slot::B).unwrap());
        assert_eq!(
            s.update_status(Slot::A).unwrap(),
            UpdateStatus::Failed(Slot::B)
        );
        assert_eq!(s.active().unwrap(), Some(Slot::A));
        // And it stays on the old slot.
        assert_eq!(boot(&mut s, true).slot, Slot::A);
        assert_eq!(
            s.update_status(Slot::A).unwrap(),
            UpdateStatus::Failed(Slot::B)
        );
        // The next update to B starts clean.
        s.mark_try_once(Slot::B).unwrap();
        assert_eq!(boot(&mut s, true).slot, Slot::B);
        assert_eq!(s.update_status(Slot::B).unwrap(), UpdateStatus::None);
    }

    #[test]
    fn new_slot_that_boots_but_is_marked_bad_falls_back() {
        let mut s = AbState::installed(Slot::A);
        s.mark_try_once(Slot::B).unwrap();
        assert_eq!(boot(&mut s, false).slot, Slot::B);
        s.mark_bad(Slot::B).unwrap();
        assert_eq!(s.order().unwrap(), [Slot::A, Slot::B]);
        assert!(!s.ok(Slot::B).unwrap());
        assert_eq!(
            s.update_status(Slot::B).unwrap(),
            UpdateStatus::Failed(Slot::B)
        );
        assert_eq!(boot(&mut s, true).slot, Slot::A);
        assert_eq!(
            s.update_status(Slot::A).unwrap(),
            UpdateStatus::Failed(Slot::B)
        );
    }

    #[test]
    fn mark_bad_of_the_second_slot_keeps_the_order() {
        let mut s = AbState::installed(Slot::A);
        s.mark_try_once(Slot::B).unwrap();
        s.mark_good(Slot::B).unwrap();
        s.mark_bad(Slot::A).unwrap();
        assert_eq!(s.order().unwrap(), [Slot::B, Slot::A]);
        assert!(!s.ok(Slot::A).unwrap());
    }

    #[test]
    fn power_loss_during_a_normal_boot_still_boots_the_good_slot() {
        // A good slot, no update: GRUB sets TRY=1 and the power goes before mark_good. At the
        // next boot no slot is bootable by the rules; GRUB boots the one that was OK, and its
        // mark_good heals the state.
        let mut s = AbState::installed(Slot::A);
        boot(&mut s, false);
        let c = boot(&mut s, true);
        assert_eq!(
            c,
            BootChoice {
                slot: Slot::A,
                fallback: true
            }
        );
        assert!(s.ok(Slot::A).unwrap());
        assert_eq!(s.tries(Slot::A).unwrap(), 0);
        assert!(!boot(&mut s, true).fallback);
    }

    #[test]
    fn both_slots_bad_boots_the_first_of_order() {
        let mut s = AbState::installed(Slot::B);
        s.mark_bad(Slot::B).unwrap();
        let c = s.grub_boot().unwrap();
        assert!(c.fallback);
        assert_eq!(c.slot, Slot::A);
    }

    #[test]
    fn rollback_boots_the_other_good_slot_next() {
        let mut s = AbState::installed(Slot::A);
        s.mark_try_once(Slot::B).unwrap();
        boot(&mut s, true);
        assert_eq!(s.rollback(Slot::B).unwrap(), Slot::A);
        assert_eq!(s.order().unwrap(), [Slot::A, Slot::B]);
        assert_eq!(s.update_status(Slot::A).unwrap(), UpdateStatus::None);
        assert_eq!(boot(&mut s, true).slot, Slot::A);
        // B stays bootable: rolling back again returns to it.
        assert_eq!(s.rollback(Slot::A).unwrap(), Slot::B);
        assert_eq!(boot(&mut s, true).slot, Slot::B);
    }

    #[test]
    fn rollback_refuses_when_the_other_slot_is_not_good() {
        let mut s = AbState::installed(Slot::A);
        let before = s.clone();
        assert!(matches!(
            s.rollback(Slot::A),
            Err(Error::NoRollback(Slot::B))
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn missing_variables_read_as_order_a_b_and_nothing_bootable() {
        let s = AbState::from_env(GrubEnv::new()).unwrap();
        assert_eq!(s.order().unwrap(), [Slot::A, Slot::B]);
        assert!(!s.ok(Slot::A).unwrap());
        assert_eq!(s.active().unwrap(), None);
    }

    #[test]
    fn refuses_a_block_with_values_it_cannot_have_written() {
        for (name, value) in [
            ("ORDER", "A A"),
            ("ORDER", "A"),
            ("ORDER", "A B C"),
            ("ORDER", "a b"),
            ("A_OK", "yes"),
            ("B_TRY", "-1"),
            (PENDING, "C"),
        ] {
            let mut env = AbState::installed(Slot::A).env().clone();
            env.set(name, value).unwrap();
            assert!(AbState::from_env(env).is_err(), "{name}={value}");
        }
    }

    #[test]
    fn keeps_variables_it_does_not_own() {
        let mut env = GrubEnv::new();
        env.set("saved_entry", "1").unwrap();
        let mut s = AbState::from_env(env).unwrap();
        s.mark_try_once(Slot::A).unwrap();
        assert_eq!(s.env().get("saved_entry"), Some("1"));
    }

    #[test]
    fn state_survives_a_store_and_load() {
        let dir = std::env::temp_dir().join(format!("hvnode-slots-{}", std::process::id()));
        let path = dir.join("grubenv");
        let mut s = AbState::installed(Slot::A);
        s.mark_try_once(Slot::B).unwrap();
        s.store(&path).unwrap();
        let back = AbState::load(&path).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.pending().unwrap(), Some(Slot::B));
        std::fs::write(&path, b"not a block").unwrap();
        assert!(matches!(
            AbState::load(&path),
            Err(Error::Env(grubenv::Error::Size(11)))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_the_booted_slot_from_the_command_line() {
        assert_eq!(
            booted_from_cmdline("console=ttyS0 hvnode.slot=B quiet"),
            Some(Slot::B)
        );
        assert_eq!(booted_from_cmdline("console=ttyS0"), None);
        assert_eq!(booted_from_cmdline("hvnode.slot=C"), None);
    }

    #[test]
    fn grub_script_uses_the_same_variables() {
        for var in [
            "ORDER",
            "A_OK",
            "A_TRY",
            "B_OK",
            "B_TRY",
            "hvnode_slot",
            "save_env",
        ] {
            assert!(GRUB_SCRIPT.contains(var), "{var}");
        }
        // GRUB must never save ORDER or HVNODE_PENDING: those are the node's to change.
        let saves: Vec<&str> = GRUB_SCRIPT
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("save_env"))
            .collect();
        assert!(!saves.is_empty());
        for line in saves {
            assert!(!line.contains("ORDER") && !line.contains(PENDING), "{line}");
        }
    }

    #[test]
    fn grub_script_passes_grub_script_check() {
        let Ok(out) = std::process::Command::new("grub-script-check")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../image/grub-ab.cfg"))
            .output()
        else {
            eprintln!("skipped: grub-script-check is not installed (grub-common)");
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
