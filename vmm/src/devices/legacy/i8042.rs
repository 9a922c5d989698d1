//! An i8042 keyboard controller with a PS/2 keyboard behind it: enough for Linux's i8042 and
//! atkbd drivers to find a keyboard, so that a graceful shutdown can press ctrl-alt-del, and for
//! the reset line (command 0xFE) that reboots the guest.
//!
//! The controller has no AUX (mouse) port. The DSDT lists only the keyboard (PNP0303), which
//! makes Linux skip the AUX probe; booted with `i8042.nopnp` it probes anyway, and the answers
//! here end that probe at once (the AUX loop byte comes back on the keyboard side, the AUX
//! interface test reports a stuck clock line) instead of after a 500 ms timeout.
//!
//! Data the guest reads from port 0x60 comes from a single output register. The controller's
//! own answers go straight into it; the keyboard's answers and scancodes queue behind it and
//! move in one at a time as the guest reads. Each byte that lands in the register raises IRQ 1
//! when the command byte enables the keyboard interrupt.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use crate::devices::pio::{PioDevice, PortExit};

/// The data port: output register on reads, keyboard data or command parameters on writes.
pub const DATA_PORT: u16 = 0x60;
/// The status register on reads, controller commands on writes.
pub const COMMAND_PORT: u16 = 0x64;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
/// Set when the keyboard is not inhibited by the (absent) key lock.
const STATUS_UNLOCKED: u8 = 0x10;

const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;

/// The command byte as firmware leaves it: translation on, keyboard interrupt on, no AUX.
const CTR_AT_BOOT: u8 = CTR_TRANSLATE | CTR_AUX_DISABLED | CTR_SYS | CTR_KBD_INT;

const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const KBD_ECHO: u8 = 0xee;
/// A keyboard holds this many bytes of keys not yet read; later keys are lost, as on hardware.
const KEY_BUFFER: usize = 64;

/// Scancodes of ctrl-alt-del as the guest reads them with translation on (or with set 1
/// selected): left ctrl, left alt, keypad del pressed, then released in reverse order. Linux's
/// default keymap maps ctrl+alt+KP_Period (keycode 83) to Boot, as it does the grey Delete.
const CTRL_ALT_DEL_SET1: [u8; 6] = [0x1d, 0x38, 0x53, 0xd3, 0xb8, 0x9d];
/// The same keys in scancode set 2, untranslated (0xF0 prefixes a release).
const CTRL_ALT_DEL_SET2: [u8; 9] = [0x14, 0x11, 0x71, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];

/// What a write did beyond changing the controller's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum WriteOutcome {
    /// Nothing else.
    Done,
    /// The guest pulsed the CPU reset line.
    Reset,
}

/// A controller command waiting for its parameter on the data port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PendingWrite {
    Ctr,
    OutputPort,
    KbdOutput,
    AuxOutput,
    Aux,
}

/// The keyboard behind the controller.
#[derive(Debug)]
struct Keyboard {
    /// Answers to commands; they flow even while scanning is off.
    replies: VecDeque<u8>,
    /// Scancodes; they flow only while scanning is on.
    keys: VecDeque<u8>,
    scanning: bool,
    /// A command waiting for its parameter byte.
    expect: Option<u8>,
    set: u8,
    last_sent: u8,
}

impl Keyboard {
    fn new() -> Self {
        Keyboard {
            replies: VecDeque::new(),
            keys: VecDeque::new(),
            scanning: true,
            expect: None,
            set: 2,
            last_sent: 0,
        }
    }

    fn next(&mut self) -> Option<u8> {
        let b = match self.replies.pop_front() {
            Some(b) => b,
            None if self.scanning => self.keys.pop_front()?,
            None => return None,
        };
        self.last_sent = b;
        Some(b)
    }

    fn reply(&mut self, bytes: &[u8]) {
        self.replies.extend(bytes);
    }

    /// A byte the guest sent to the keyboard; `translated` is the controller's translation bit.
    fn write(&mut self, b: u8, translated: bool) {
        if let Some(cmd) = self.expect.take() {
            match (cmd, b) {
                // Query the current set: the answer passes through the translation.
                (0xf0, 0) => {
                    let set = match (translated, self.set) {
                        (true, 1) => 0x43,
                        (true, _) => 0x41,
                        (false, s) => s,
                    };
                    self.reply(&[KBD_ACK, set]);
                }
                (0xf0, 1 | 2) => {
                    self.set = b;
                    self.reply(&[KBD_ACK]);
                }
                // Set 3 is not implemented: refuse it and the driver keeps set 2.
                (0xf0, _) => self.reply(&[KBD_RESEND]),
                // LEDs and typematic rate: accepted, nothing to show or repeat.
                _ => self.reply(&[KBD_ACK]),
            }
            return;
        }
        // A command makes the keyboard drop answers the guest has not read yet.
        self.replies.clear();
        match b {
            0xed | 0xf0 | 0xf3 => {
                self.expect = Some(b);
                self.reply(&[KBD_ACK]);
            }
            0xee => self.reply(&[KBD_ECHO]),
            0xf2 => {
                let id = if translated { 0x41 } else { 0x83 };
                self.reply(&[KBD_ACK, 0xab, id]);
            }
            0xf4 => {
                self.scanning = true;
                self.reply(&[KBD_ACK]);
            }
            0xf5 => {
                self.scanning = false;
                self.set = 2;
                self.reply(&[KBD_ACK]);
            }
            0xf6 => {
                self.set = 2;
                self.reply(&[KBD_ACK]);
            }
            0xf7..=0xfd => self.reply(&[KBD_ACK]),
            0xfe => {
                let last = self.last_sent;
                self.reply(&[last]);
            }
            0xff => {
                self.scanning = true;
                self.set = 2;
                self.reply(&[KBD_ACK, KBD_SELF_TEST_PASSED]);
            }
            _ => self.reply(&[KBD_RESEND]),
        }
    }

    fn press(&mut self, codes: &[u8]) {
        for &c in codes {
            if self.keys.len() < KEY_BUFFER {
                self.keys.push_back(c);
            }
        }
    }
}

/// Where the byte in the output register came from, so that a controller answer that
/// displaces a keyboard byte can put it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Source {
    Controller,
    Reply,
    Key,
}

/// The controller and its keyboard as a snapshot holds them: the command byte, the output
/// register, a command waiting for its parameter, and the keyboard's queued answers and keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    ctr: u8,
    last_was_command: bool,
    pending: Option<PendingWrite>,
    output: Option<(u8, Source)>,
    last_read: u8,
    kbd_replies: Vec<u8>,
    kbd_keys: Vec<u8>,
    kbd_scanning: bool,
    kbd_expect: Option<u8>,
    kbd_set: u8,
    kbd_last_sent: u8,
}

impl Default for I8042State {
    /// The controller as firmware leaves it.
    fn default() -> Self {
        let kbd = Keyboard::new();
        I8042State {
            ctr: CTR_AT_BOOT,
            last_was_command: false,
            pending: None,
            output: None,
            last_read: 0,
            kbd_replies: Vec::new(),
            kbd_keys: Vec::new(),
            kbd_scanning: kbd.scanning,
            kbd_expect: kbd.expect,
            kbd_set: kbd.set,
            kbd_last_sent: kbd.last_sent,
        }
    }
}

/// The controller and its keyboard. `T` raises IRQ 1.
#[derive(Debug)]
pub struct I8042<T: Trigger> {
    ctr: u8,
    last_was_command: bool,
    pending: Option<PendingWrite>,
    output: Option<(u8, Source)>,
    last_read: u8,
    kbd: Keyboard,
    irq: T,
}

impl<T: Trigger> I8042<T> {
    /// A controller in the state firmware leaves it, raising `irq` for keyboard data.
    pub fn new(irq: T) -> Self {
        I8042 {
            ctr: CTR_AT_BOOT,
            last_was_command: false,
            pending: None,
            output: None,
            last_read: 0,
            kbd: Keyboard::new(),
            irq,
        }
    }

    /// Its state, for a snapshot.
    pub fn state(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            last_was_command: self.last_was_command,
            pending: self.pending,
            output: self.output,
            last_read: self.last_read,
            kbd_replies: self.kbd.replies.iter().copied().collect(),
            kbd_keys: self.kbd.keys.iter().copied().collect(),
            kbd_scanning: self.kbd.scanning,
            kbd_expect: self.kbd.expect,
            kbd_set: self.kbd.set,
            kbd_last_sent: self.kbd.last_sent,
        }
    }

    /// A controller as `state` has it, raising `irq`. A byte waiting in the output register
    /// interrupts again: the guest may not have taken the interrupt it raised before.
    pub fn from_state(state: &I8042State, irq: T) -> Self {
        let mut c = I8042 {
            ctr: state.ctr,
            last_was_command: state.last_was_command,
            pending: state.pending,
            output: state.output,
            last_read: state.last_read,
            kbd: Keyboard {
                replies: state.kbd_replies.iter().copied().collect(),
                keys: state.kbd_keys.iter().copied().take(KEY_BUFFER).collect(),
                scanning: state.kbd_scanning,
                expect: state.kbd_expect,
                set: state.kbd_set,
                last_sent: state.kbd_last_sent,
            },
            irq,
        };
        if c.output.is_some() {
            c.raise_irq();
        }
        c
    }

    /// A guest read of `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            DATA_PORT => {
                if let Some((b, _)) = self.output.take() {
                    self.last_read = b;
                    self.refill();
                }
                // An empty output register reads as whatever it last held.
                self.last_read
            }
            COMMAND_PORT => {
                let mut s = STATUS_UNLOCKED;
                if self.ctr & CTR_SYS != 0 {
                    s |= STATUS_SYS;
                }
                if self.output.is_some() {
                    s |= STATUS_OBF;
                }
                if self.last_was_command {
                    s |= STATUS_CMD;
                }
                s
            }
            _ => 0xff,
        }
    }

    /// A guest write of `value` to `port`.
    pub fn write(&mut self, port: u16, value: u8) -> WriteOutcome {
        match port {
            DATA_PORT => {
                self.last_was_command = false;
                self.write_data(value)
            }
            COMMAND_PORT => {
                self.last_was_command = true;
                self.command(value)
            }
            _ => WriteOutcome::Done,
        }
    }

    /// Presses and releases ctrl-alt-del. The scancodes wait in the keyboard until the guest's
    /// driver has scanning on and the keyboard interface enabled.
    pub fn press_ctrl_alt_del(&mut self) {
        if self.ctr & CTR_TRANSLATE != 0 || self.kbd.set == 1 {
            self.kbd.press(&CTRL_ALT_DEL_SET1);
        } else {
            self.kbd.press(&CTRL_ALT_DEL_SET2);
        }
        self.refill();
    }

    fn command(&mut self, cmd: u8) -> WriteOutcome {
        self.pending = None;
        match cmd {
            0x20 => self.answer(self.ctr),
            0x60 => self.pending = Some(PendingWrite::Ctr),
            0xa7 => self.ctr |= CTR_AUX_DISABLED,
            0xa8 => self.ctr &= !CTR_AUX_DISABLED,
            // AUX interface test: clock line stuck high, i.e. nothing there.
            0xa9 => self.answer(0x02),
            0xaa => {
                self.ctr |= CTR_SYS;
                self.answer(0x55);
            }
            // Keyboard interface test: no error.
            0xab => self.answer(0x00),
            0xad => self.ctr |= CTR_KBD_DISABLED,
            0xae => {
                self.ctr &= !CTR_KBD_DISABLED;
                self.refill();
            }
            // Output port: reset line high (not in reset), A20 on, output buffer full bit.
            0xd0 => {
                let obf = if self.output.is_some() { 0x10 } else { 0 };
                self.answer(0x03 | obf);
            }
            0xd1 => self.pending = Some(PendingWrite::OutputPort),
            0xd2 => self.pending = Some(PendingWrite::KbdOutput),
            0xd3 => self.pending = Some(PendingWrite::AuxOutput),
            0xd4 => self.pending = Some(PendingWrite::Aux),
            // Pulse output lines low for 6 us; bit 0 is the CPU reset line.
            0xf0..=0xff if cmd & 1 == 0 => return WriteOutcome::Reset,
            _ => {}
        }
        WriteOutcome::Done
    }

    fn write_data(&mut self, value: u8) -> WriteOutcome {
        match self.pending.take() {
            Some(PendingWrite::Ctr) => {
                let enabled_irq = value & CTR_KBD_INT != 0 && self.ctr & CTR_KBD_INT == 0;
                self.ctr = value;
                if enabled_irq && self.output.is_some() {
                    self.raise_irq();
                }
                self.refill();
            }
            Some(PendingWrite::OutputPort) if value & 1 == 0 => return WriteOutcome::Reset,
            Some(PendingWrite::OutputPort) => {}
            Some(PendingWrite::KbdOutput) => {
                self.kbd.replies.push_front(value);
                self.refill();
            }
            // No AUX channel: the loop byte comes back as keyboard-side data.
            Some(PendingWrite::AuxOutput) => self.answer(value),
            // No AUX device to receive it.
            Some(PendingWrite::Aux) => {}
            None => {
                let translated = self.ctr & CTR_TRANSLATE != 0;
                self.kbd.write(value, translated);
                self.refill();
            }
        }
        WriteOutcome::Done
    }

    /// Puts a controller answer in the output register; a keyboard byte it displaces goes
    /// back to the head of its queue.
    fn answer(&mut self, b: u8) {
        match self.output.replace((b, Source::Controller)) {
            Some((old, Source::Reply)) => self.kbd.replies.push_front(old),
            Some((old, Source::Key)) => self.kbd.keys.push_front(old),
            Some((_, Source::Controller)) | None => {}
        }
        self.raise_irq();
    }

    /// Moves the keyboard's next byte into an empty output register.
    fn refill(&mut self) {
        if self.output.is_some() || self.ctr & CTR_KBD_DISABLED != 0 {
            return;
        }
        let from_replies = !self.kbd.replies.is_empty();
        if let Some(b) = self.kbd.next() {
            let src = if from_replies {
                Source::Reply
            } else {
                Source::Key
            };
            self.output = Some((b, src));
            self.raise_irq();
        }
    }

    fn raise_irq(&mut self) {
        if self.ctr & CTR_KBD_INT != 0 {
            // The eventfd write fails only when its counter is saturated: the interrupt is
            // pending anyway.
            let _ = self.irq.trigger();
        }
    }
}

impl<T: Trigger + Send> PioDevice for I8042<T> {
    fn read(&mut self, base: u16, offset: u16) -> u8 {
        I8042::read(self, base + offset)
    }

    fn write(&mut self, base: u16, offset: u16, value: u8) -> Option<PortExit> {
        match I8042::write(self, base + offset, value) {
            WriteOutcome::Done => None,
            WriteOutcome::Reset => Some(PortExit::Reset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[derive(Debug, Default, Clone)]
    struct CountingIrq(Rc<Cell<u32>>);

    impl Trigger for CountingIrq {
        type E = std::convert::Infallible;
        fn trigger(&self) -> Result<(), Self::E> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }
    }

    fn controller() -> (I8042<CountingIrq>, Rc<Cell<u32>>) {
        let irq = CountingIrq::default();
        let count = Rc::clone(&irq.0);
        (I8042::new(irq), count)
    }

    fn command(c: &mut I8042<CountingIrq>, cmd: u8) {
        assert_eq!(c.write(COMMAND_PORT, cmd), WriteOutcome::Done);
    }

    fn send(c: &mut I8042<CountingIrq>, b: u8) {
        assert_eq!(c.write(DATA_PORT, b), WriteOutcome::Done);
    }

    /// Reads every byte the output register offers, as a polling driver would.
    fn drain(c: &mut I8042<CountingIrq>) -> Vec<u8> {
        let mut out = Vec::new();
        while c.read(COMMAND_PORT) & STATUS_OBF != 0 {
            out.push(c.read(DATA_PORT));
        }
        out
    }

    #[test]
    fn controller_self_test_answers_0x55_and_sets_the_system_flag() {
        let (mut c, _) = controller();
        send_ctr(&mut c, 0);
        assert_eq!(c.read(COMMAND_PORT) & STATUS_SYS, 0);
        command(&mut c, 0xaa);
        let status = c.read(COMMAND_PORT);
        assert_eq!(status & (STATUS_OBF | STATUS_SYS | STATUS_CMD), 0x0d);
        assert_eq!(drain(&mut c), [0x55]);
        assert_eq!(c.read(COMMAND_PORT) & STATUS_OBF, 0);
    }

    fn send_ctr(c: &mut I8042<CountingIrq>, ctr: u8) {
        command(c, 0x60);
        send(c, ctr);
    }

    #[test]
    fn command_byte_reads_back_what_was_written() {
        let (mut c, _) = controller();
        command(&mut c, 0x20);
        assert_eq!(drain(&mut c), [CTR_AT_BOOT]);
        send_ctr(&mut c, 0x74);
        command(&mut c, 0x20);
        assert_eq!(drain(&mut c), [0x74]);
        command(&mut c, 0xa8);
        command(&mut c, 0x20);
        assert_eq!(drain(&mut c), [0x54]);
    }

    #[test]
    fn keyboard_answers_reset_and_identify() {
        let (mut c, _) = controller();
        send(&mut c, 0xff);
        assert_eq!(drain(&mut c), [0xfa, 0xaa]);
        // Translated, as Linux leaves it: the id's second byte passes through the translation.
        send(&mut c, 0xf2);
        assert_eq!(drain(&mut c), [0xfa, 0xab, 0x41]);
        send_ctr(&mut c, CTR_AT_BOOT & !CTR_TRANSLATE);
        send(&mut c, 0xf2);
        assert_eq!(drain(&mut c), [0xfa, 0xab, 0x83]);
    }

    #[test]
    fn keyboard_acknowledges_leds_typematic_and_scancode_set() {
        let (mut c, _) = controller();
        for (cmd, param) in [(0xed, 0x07), (0xf3, 0x20), (0xf0, 0x02)] {
            send(&mut c, cmd);
            send(&mut c, param);
            assert_eq!(drain(&mut c), [0xfa, 0xfa], "command {cmd:#x}");
        }
        send(&mut c, 0xf0);
        send(&mut c, 0x00);
        assert_eq!(drain(&mut c), [0xfa, 0xfa, 0x41]);
        send(&mut c, 0xf0);
        send(&mut c, 0x03);
        assert_eq!(drain(&mut c), [0xfa, 0xfe]);
        send(&mut c, 0x42);
        assert_eq!(drain(&mut c), [0xfe]);
    }

    #[test]
    fn reports_no_aux_port_without_a_timeout() {
        let (mut c, _) = controller();
        // Linux's AUX loop test: the byte must come back without the AUX data bit.
        command(&mut c, 0xd3);
        send(&mut c, 0x5a);
        let status = c.read(COMMAND_PORT);
        assert_eq!(status & (STATUS_OBF | 0x20), STATUS_OBF);
        // The driver gives up on the loop without reading it and runs the interface test,
        // whose answer replaces the unread byte.
        command(&mut c, 0xa9);
        assert_eq!(drain(&mut c), [0x02]);
    }

    #[test]
    fn ctrl_alt_del_arrives_as_set_1_scancodes_when_translated() {
        let (mut c, _) = controller();
        c.press_ctrl_alt_del();
        assert_eq!(drain(&mut c), CTRL_ALT_DEL_SET1);
        send_ctr(&mut c, CTR_AT_BOOT & !CTR_TRANSLATE);
        c.press_ctrl_alt_del();
        assert_eq!(drain(&mut c), CTRL_ALT_DEL_SET2);
    }

    #[test]
    fn keys_wait_while_the_keyboard_is_disabled_or_not_scanning() {
        let (mut c, _) = controller();
        command(&mut c, 0xad);
        c.press_ctrl_alt_del();
        assert!(drain(&mut c).is_empty());
        send(&mut c, 0xf5);
        assert!(drain(&mut c).is_empty());
        command(&mut c, 0xae);
        assert_eq!(drain(&mut c), [0xfa]);
        c.press_ctrl_alt_del();
        assert!(drain(&mut c).is_empty());
        send(&mut c, 0xf4);
        let mut want = vec![0xfa];
        want.extend_from_slice(&CTRL_ALT_DEL_SET1);
        want.extend_from_slice(&CTRL_ALT_DEL_SET1);
        assert_eq!(drain(&mut c), want);
    }

    #[test]
    fn controller_answer_does_not_lose_a_pending_scancode() {
        let (mut c, _) = controller();
        c.press_ctrl_alt_del();
        command(&mut c, 0x20);
        let mut want = vec![CTR_AT_BOOT];
        want.extend_from_slice(&CTRL_ALT_DEL_SET1);
        assert_eq!(drain(&mut c), want);
    }

    #[test]
    fn interrupts_only_while_the_command_byte_enables_them() {
        let (mut c, irqs) = controller();
        send_ctr(&mut c, CTR_AT_BOOT & !CTR_KBD_INT);
        c.press_ctrl_alt_del();
        assert_eq!(irqs.get(), 0);
        // Enabling the interrupt with a byte waiting raises it at once.
        send_ctr(&mut c, CTR_AT_BOOT);
        assert_eq!(irqs.get(), 1);
        // One interrupt per byte that moves into the output register.
        assert_eq!(drain(&mut c).len(), CTRL_ALT_DEL_SET1.len());
        assert_eq!(irqs.get(), CTRL_ALT_DEL_SET1.len() as u32);
    }

    #[test]
    fn reset_line_pulses_reboot() {
        let (mut c, _) = controller();
        assert_eq!(c.write(COMMAND_PORT, 0xfe), WriteOutcome::Reset);
        assert_eq!(c.write(COMMAND_PORT, 0xff), WriteOutcome::Done);
        command(&mut c, 0xd1);
        assert_eq!(c.write(DATA_PORT, 0x02), WriteOutcome::Reset);
        command(&mut c, 0xd1);
        assert_eq!(c.write(DATA_PORT, 0x03), WriteOutcome::Done);
    }

    #[test]
    fn state_round_trips_with_a_pending_command_and_queued_keys() {
        let (mut c, irqs) = controller();
        command(&mut c, 0x60);
        c.press_ctrl_alt_del();
        let json = serde_json::to_string(&c.state()).unwrap();
        let state: I8042State = serde_json::from_str(&json).unwrap();
        assert_eq!(state, c.state());
        let before = irqs.get();
        let mut back = I8042::from_state(&state, CountingIrq(Rc::clone(&irqs)));
        assert_eq!(
            irqs.get(),
            before + 1,
            "the output register interrupts again"
        );
        assert_eq!(back.state(), state);
        assert_eq!(drain(&mut back), drain(&mut c));
        assert_eq!(I8042State::default(), controller().0.state());
    }

    #[test]
    fn key_buffer_is_bounded() {
        let (mut c, _) = controller();
        command(&mut c, 0xad);
        for _ in 0..100 {
            c.press_ctrl_alt_del();
        }
        command(&mut c, 0xae);
        assert_eq!(drain(&mut c).len(), KEY_BUFFER);
    }
}
