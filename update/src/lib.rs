//! A/B updates of an hvnode node: GRUB's environment block ([`grubenv`]), the slot state machine
//! kept in it ([`slots`], RAUC's scheme), release keys ([`keys`]) and the signed update bundle
//! ([`bundle`]). See docs/update.md.
//!
//! No I/O beyond files: installing a bundle into a slot and the agent's API come later.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod grubenv;
pub mod keys;
pub mod slots;
