//! A/B updates of an hvnode node: GRUB's environment block ([`grubenv`]), the slot state machine
//! kept in it ([`slots`], RAUC's scheme), release keys ([`keys`]), the signed update bundle
//! ([`bundle`]), and the disk: GUID partition tables ([`gpt`]), the installed layout and its EFI
//! system partition ([`disk`]), writing one slot ([`slot`]) and installing ([`install`]). See
//! docs/update.md and docs/install.md.
//!
//! No I/O beyond files and block devices opened as files; the agent's API lives in the agent.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod disk;
pub mod gpt;
pub mod grubenv;
pub mod install;
pub mod keys;
pub mod slot;
pub mod slots;
pub mod sysfs;
