use crate::memory::GuestRam;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{Queue, QueueState, QueueT};

use super::tap::VNET_HDR_LEN;
use crate::devices::chain::Progress;
use crate::devices::chain::{self, QueueFault};
use crate::devices::worker::{Handler, Worker};
use crate::devices::{Activation, Counter, DeviceError, VirtioDevice};

/// The largest frame either way: a 64 KiB payload plus an Ethernet header with a VLAN tag.
pub const MAX_FRAME: usize = (64 << 10) + 18;
const QUEUE_SIZES: [u16; 2] = [256, 256];
const RX: usize = 0;
const TX: usize = 1;

#[derive(Debug, Default)]
struct Counters {
    rx_packets: Counter,
    rx_bytes: Counter,
    rx_dropped: Counter,
    tx_packets: Counter,
    tx_bytes: Counter,
    tx_dropped: Counter,
    errors: Counter,
}

/// The virtio-net device.
#[derive(Debug)]
pub struct Net {
    tap: Arc<File>,
    config: [u8; 8],
    counters: Arc<Counters>,
}

impl Net {
    /// A device on `tap` (non-blocking, with [`VNET_HDR_LEN`]-byte headers, as
    /// [`super::tap::open`] returns it) whose guest MAC address is `mac`.
    pub fn new(tap: File, mac: [u8; 6]) -> Net {
        // virtio_net_config: mac, status.
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Net {
            tap: Arc::new(tap),
            config,
            counters: Arc::default(),
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, a: Activation) -> Result<Worker, DeviceError> {
        let got = a.queues.len();
        let Ok([rx, tx]) = <[_; 2]>::try_from(a.queues) else {
            return Err(DeviceError::QueueCount { expected: 2, got });
        };
        let handler = NetHandler::new(
            a.mem,
            rx.queue,
            tx.queue,
            Arc::clone(&self.tap),
            Arc::clone(&self.counters),
        );
        Worker::spawn("virtio-net", handler, vec![rx.event, tx.event], a.interrupt)
            .map_err(DeviceError::Worker)
    }

    /// A RARP request from the guest's MAC to everyone, as QEMU and Cloud Hypervisor send after
    /// a migration: the bridge, and the switches beyond it, learn the MAC on this tap's port at
    /// once instead of when the guest next sends.
    fn announce(&self) -> std::io::Result<bool> {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        let frame = rarp_announce(mac);
        (&*self.tap).write_all(&frame)?;
        Ok(true)
    }

    fn stats(&self) -> BTreeMap<String, u64> {
        let c = &self.counters;
        BTreeMap::from([
            ("rx_packets".to_owned(), c.rx_packets.get()),
            ("rx_bytes".to_owned(), c.rx_bytes.get()),
            ("rx_dropped".to_owned(), c.rx_dropped.get()),
            ("tx_packets".to_owned(), c.tx_packets.get()),
            ("tx_bytes".to_owned(), c.tx_bytes.get()),
            ("tx_dropped".to_owned(), c.tx_dropped.get()),
            ("errors".to_owned(), c.errors.get()),
        ])
    }
}

/// A RARP "request reverse" frame (RFC 903) from `mac`, broadcast, with the tap's virtio-net
/// header in front: the frame hypervisors send to move a MAC to a new port.
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]); // destination: broadcast
    f.extend_from_slice(&mac); // source
    f.extend_from_slice(&0x8035u16.to_be_bytes()); // EtherType: RARP
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]); // address lengths
    f.extend_from_slice(&3u16.to_be_bytes()); // op: request reverse
    f.extend_from_slice(&mac); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address
    f.extend_from_slice(&mac); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address
    f.resize(VNET_HDR_LEN + 60, 0); // the Ethernet minimum, without the FCS
    f
}

/// What became of a receive buffer.
enum Rx {
    /// The frame went in: bytes written.
    Put(usize),
    /// The buffer cannot hold the frame.
    TooSmall,
    /// Device-readable, outside guest memory, or otherwise unusable.
    Malformed,
}

/// The queues and the tap. A frame read from the tap while the guest has no receive buffer is
/// kept (one at most) and the tap is not watched until the guest adds buffers.
struct NetHandler {
    mem: GuestRam,
    rx: Queue,
    tx: Queue,
    tap: Arc<File>,
    counters: Arc<Counters>,
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    rx_blocked: bool,
    tap_failed: bool,
    tx_frame: Vec<u8>,
    used: bool,
}

impl NetHandler {
    fn new(mem: GuestRam, rx: Queue, tx: Queue, tap: Arc<File>, counters: Arc<Counters>) -> Self {
        NetHandler {
            mem,
            rx,
            tx,
            tap,
            counters,
            rx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME],
            rx_pending: None,
            rx_blocked: false,
            tap_failed: false,
            tx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME],
            used: false,
        }
    }

    fn progress(&mut self, more: bool) -> Progress {
        Progress {
            used: std::mem::take(&mut self.used),
            more,
        }
    }

    /// Puts the pending frame in the next receive buffer. `false` when the guest has none.
    fn deliver(&mut self) -> Result<bool, QueueFault> {
        let Some(len) = self.rx_pending else {
            return Ok(true);
        };
        let frame = &mut self.rx_frame[..len];
        // num_buffers: always one buffer without VIRTIO_NET_F_MRG_RXBUF.
        frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        for _ in 0..self.rx.size() {
            let Some(c) = chain::pop(&mut self.rx, &self.mem)? else {
                return Ok(false);
            };
            let head = c.head_index();
            let outcome = match chain::parse(c) {
                Ok(c) if c.fault.is_none() && c.readable.is_empty() => {
                    if c.writable_len() >= len as u64 {
                        chain::scatter(&self.mem, &c.writable, frame).map_or(Rx::Malformed, Rx::Put)
                    } else {
                        Rx::TooSmall
                    }
                }
                _ => Rx::Malformed,
            };
            let written = if let Rx::Put(n) = outcome {
                n as u32
            } else {
                0
            };
            chain::complete(&mut self.rx, &self.mem, head, written)?;
            self.used = true;
            match outcome {
                Rx::Put(n) => {
                    self.counters.rx_packets.inc();
                    self.counters.rx_bytes.add((n - VNET_HDR_LEN) as u64);
                    self.rx_pending = None;
                    return Ok(true);
                }
                // The frame is dropped, not cut to fit.
                Rx::TooSmall => {
                    self.counters.rx_dropped.inc();
                    self.rx_pending = None;
                    return Ok(true);
                }
                // Returned empty; the frame is tried on the next buffer.
                Rx::Malformed => self.counters.errors.inc(),
            }
        }
        // The guest keeps offering malformed buffers: drop the frame rather than spin.
        self.counters.rx_dropped.inc();
        self.rx_pending = None;
        Ok(true)
    }

    fn receive(&mut self) -> Result<Progress, QueueFault> {
        for _ in 0..self.rx.size() {
            if self.rx_pending.is_none() {
                match (&*self.tap).read(&mut self.rx_frame) {
                    Ok(n) if n >= VNET_HDR_LEN => self.rx_pending = Some(n),
                    Ok(_) => {
                        self.counters.errors.inc();
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(self.progress(false)),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        // A tap that errors (its interface deleted) stays readable for epoll:
                        // stop watching it rather than spin.
                        self.counters.errors.inc();
                        self.tap_failed = true;
                        return Ok(self.progress(false));
                    }
                }
            }
            if !self.deliver()? {
                self.rx_blocked = true;
                return Ok(self.progress(false));
            }
        }
        Ok(self.progress(false))
    }

    fn transmit(&mut self) -> Result<Progress, QueueFault> {
        for _ in 0..self.tx.size() {
            let Some(c) = chain::pop(&mut self.tx, &self.mem)? else {
                return Ok(self.progress(false));
            };
            let head = c.head_index();
            match chain::parse(c) {
                Ok(c)
                    if c.fault.is_none()
                        && c.writable.is_empty()
                        && (VNET_HDR_LEN as u64..=self.tx_frame.len() as u64)
                            .contains(&c.readable_len()) =>
                {
                    let len = c.readable_len() as usize;
                    let frame = &mut self.tx_frame[..len];
                    if chain::read_prefix(&self.mem, &c.readable, frame) {
                        // No offload was negotiated: the host kernel gets no GSO or checksum
                        // requests from the guest.
                        frame[..VNET_HDR_LEN].fill(0);
                        // A tap takes a frame whole or not at all.
                        match (&*self.tap).write(frame) {
                            Ok(n) if n == len => {
                                self.counters.tx_packets.inc();
                                self.counters.tx_bytes.add((len - VNET_HDR_LEN) as u64);
                            }
                            Ok(_) | Err(_) => self.counters.tx_dropped.inc(),
                        }
                    } else {
                        self.counters.errors.inc();
                    }
                }
                _ => self.counters.errors.inc(),
            }
            chain::complete(&mut self.tx, &self.mem, head, 0)?;
            self.used = true;
        }
        Ok(self.progress(true))
    }
}

impl Handler for NetHandler {
    fn queues(&self) -> Vec<QueueState> {
        vec![self.rx.state(), self.tx.state()]
    }

    fn queue_event(&mut self, index: usize) -> Result<Progress, QueueFault> {
        match index {
            RX => {
                // New receive buffers: deliver the frame that waited, then watch the tap again.
                if self.deliver()? {
                    self.rx_blocked = false;
                }
                Ok(self.progress(false))
            }
            TX => self.transmit(),
            _ => Ok(Progress::default()),
        }
    }

    fn input(&self) -> Option<(RawFd, bool)> {
        Some((self.tap.as_raw_fd(), !self.rx_blocked && !self.tap_failed))
    }

    fn input_event(&mut self) -> Result<Progress, QueueFault> {
        self.receive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::chain::testing::*;
    use crate::devices::Interrupt;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use std::time::Instant;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn announce_sends_one_broadcast_rarp_from_the_guests_mac() {
        let (a, host) = UnixDatagram::pair().unwrap();
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let net = Net::new(File::from(OwnedFd::from(a)), mac);
        assert!(net.announce().unwrap());
        let mut buf = [0u8; 256];
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(n, VNET_HDR_LEN + 60);
        let f = &buf[VNET_HDR_LEN..n];
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35], "EtherType RARP");
        assert_eq!(&f[20..22], &[0, 3], "request reverse");
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
    }
    use vmm_sys_util::eventfd::EventFd;

    /// A handler whose "tap" is one end of a datagram socket pair (frames keep their
    /// boundaries, as on a tap); the other end plays the host side.
    fn handler<'a>(
        mem: &'a GuestRam,
    ) -> (
        NetHandler,
        UnixDatagram,
        MockSplitQueue<'a, GuestRam>,
        MockSplitQueue<'a, GuestRam>,
    ) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let tap = File::from(OwnedFd::from(a));
        let rxq = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(mem, GuestAddress(0x8000), 16);
        let h = NetHandler::new(
            mem.clone(),
            queue(&rxq),
            queue(&txq),
            Arc::new(tap),
            Arc::default(),
        );
        (h, b, rxq, txq)
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend(std::iter::repeat_n(fill, len));
        f
    }

    #[test]
    fn transmits_a_gathered_frame_to_the_tap_with_a_clean_header() {
        let mem = memory();
        let (mut h, host, _rxq, txq) = handler(&mem);
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[0] = 1; // NEEDS_CSUM, never negotiated
        hdr[1] = 4; // GSO_TCPV6
        mem.write_slice(&hdr, GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&[0x5a; 60], GuestAddress(0x10_0000 + 12))
            .unwrap();
        mem.write_slice(&[0xa5; 40], GuestAddress(0x20_0000))
            .unwrap();
        offer(&txq, 0, &[ro(0x10_0000, 72), ro(0x20_0000, 40)]);
        let p = h.transmit().unwrap();
        assert!(p.used);
        let mut buf = [0u8; 200];
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(n, 112);
        assert_eq!(buf[..12], [0; 12]);
        assert_eq!(buf[12..72], [0x5a; 60]);
        assert_eq!(buf[72..112], [0xa5; 40]);
        assert_eq!(used(&txq, &mem, 0), (0, 0));
        assert_eq!(
            (h.counters.tx_packets.get(), h.counters.tx_bytes.get()),
            (1, 100)
        );
    }

    #[test]
    fn refuses_malformed_transmit_chains_and_returns_their_heads() {
        let mem = memory();
        let (mut h, host, _rxq, txq) = handler(&mem);
        // Shorter than the header; device-writable; larger than 64 KiB + header; outside memory.
        offer(&txq, 0, &[ro(0x10_0000, 4)]);
        offer(&txq, 1, &[ro(0x10_0000, 12), wo(0x20_0000, 64)]);
        offer(
            &txq,
            3,
            &[ro(0x10_0000, (VNET_HDR_LEN + MAX_FRAME + 1) as u32)],
        );
        offer(&txq, 4, &[ro(0xfff0_0000, 100)]);
        h.transmit().unwrap();
        assert_eq!(used_idx(&txq, &mem), 4);
        assert_eq!(h.counters.errors.get(), 4);
        host.set_nonblocking(true).unwrap();
        assert!(
            host.recv(&mut [0u8; 64]).is_err(),
            "nothing reached the tap"
        );
    }

    #[test]
    fn receives_a_frame_into_the_guest_buffer_with_num_buffers_set() {
        let mem = memory();
        let (mut h, host, rxq, _txq) = handler(&mem);
        offer(&rxq, 0, &[wo(0x10_0000, 1526)]);
        host.send(&frame(100, 0x33)).unwrap();
        let p = h.receive().unwrap();
        assert!(p.used);
        assert_eq!(used(&rxq, &mem, 0), (0, 112));
        let mut buf = [0u8; 112];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(buf[10..12], [1, 0], "num_buffers");
        assert_eq!(buf[12..], [0x33; 100]);
        assert_eq!(
            (h.counters.rx_packets.get(), h.counters.rx_bytes.get()),
            (1, 100)
        );
    }

    #[test]
    fn keeps_a_frame_until_the_guest_adds_receive_buffers() {
        let mem = memory();
        let (mut h, host, rxq, _txq) = handler(&mem);
        host.send(&frame(60, 0x44)).unwrap();
        let p = h.receive().unwrap();
        assert!(!p.used);
        assert_eq!(
            h.input().map(|(_, watch)| watch),
            Some(false),
            "tap not watched"
        );
        offer(&rxq, 0, &[wo(0x10_0000, 1526)]);
        let p = h.queue_event(RX).unwrap();
        assert!(p.used);
        assert_eq!(used(&rxq, &mem, 0), (0, 72));
        assert_eq!(h.input().map(|(_, watch)| watch), Some(true));
    }

    #[test]
    fn a_paused_worker_leaves_frames_in_the_tap_until_resumed() {
        let mem = memory();
        let (h, host, rxq, _txq) = handler(&mem);
        let events = [(); 2].map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let clones = events.iter().map(|e| e.try_clone().unwrap()).collect();
        let mut worker = Worker::spawn("test-net", h, clones, interrupt).unwrap();
        let deadline = || Instant::now() + std::time::Duration::from_secs(5);
        offer(&rxq, 0, &[wo(0x10_0000, 1526)]);
        offer(&rxq, 1, &[wo(0x20_0000, 1526)]);
        // Running: a frame goes straight in.
        host.send(&frame(60, 0x11)).unwrap();
        wait_for("the first frame", || used_idx(&rxq, &mem) == 1);
        worker.pause(deadline()).unwrap();
        let _ = irq.read();
        host.send(&frame(80, 0x22)).unwrap();
        events[RX].write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(
            used_idx(&rxq, &mem),
            1,
            "a frame was delivered while paused"
        );
        let mut buf = [0u8; 92];
        mem.read_slice(&mut buf, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(buf, [0; 92], "guest memory changed while paused");
        assert!(irq.read().is_err(), "no interrupt while paused");
        worker.resume();
        wait_for("the frame after resume", || used_idx(&rxq, &mem) == 2);
        assert_eq!(used(&rxq, &mem, 1), (1, 92));
        mem.read_slice(&mut buf, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(buf[12..], [0x22; 80]);
        worker.stop();
    }

    #[test]
    fn stops_watching_a_tap_that_fails() {
        let mem = memory();
        // A write-only fd: every read fails with EBADF, as a dead tap's would fail.
        let dir = std::env::temp_dir().join(format!("hvnode-net-fail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let wo_file = File::create(dir.join("sink")).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let mut h = NetHandler::new(
            mem.clone(),
            queue(&rxq),
            queue(&txq),
            Arc::new(wo_file),
            Arc::default(),
        );
        assert_eq!(h.input().map(|(_, watch)| watch), Some(true));
        h.receive().unwrap();
        assert_eq!(h.input().map(|(_, watch)| watch), Some(false));
        assert_eq!(h.counters.errors.get(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn drops_a_frame_too_large_for_the_buffer_and_skips_malformed_buffers() {
        let mem = memory();
        let (mut h, host, rxq, _txq) = handler(&mem);
        // A device-readable buffer, then one too small, then a good one.
        offer(&rxq, 0, &[ro(0x10_0000, 1526)]);
        offer(&rxq, 1, &[wo(0x20_0000, 64)]);
        offer(&rxq, 2, &[wo(0x30_0000, 1526)]);
        host.send(&frame(100, 1)).unwrap();
        host.send(&frame(30, 2)).unwrap();
        h.receive().unwrap();
        assert_eq!(used(&rxq, &mem, 0), (0, 0));
        assert_eq!(used(&rxq, &mem, 1), (1, 0), "too small: frame dropped");
        assert_eq!(used(&rxq, &mem, 2), (2, 42), "the next frame fits");
        let mut small = [0u8; 64];
        mem.read_slice(&mut small, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(small, [0; 64], "nothing cut to fit");
        assert_eq!(h.counters.rx_dropped.get(), 1);
        assert_eq!(h.counters.errors.get(), 1);
    }
}
