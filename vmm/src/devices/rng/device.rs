use crate::memory::GuestRam;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{Queue, QueueState};
use vm_memory::{GuestMemoryBackend, ReadVolatile};

use crate::devices::chain::Progress;
use crate::devices::chain::{self, Chain, QueueFault};
use crate::devices::worker::{Handler, Worker};
use crate::devices::{Activation, Counter, DeviceError, VirtioDevice};

/// Bytes handed out per request at most, so that one request cannot drain the host pool.
pub const MAX_REQUEST: u64 = 64 << 10;
const QUEUE_SIZES: [u16; 1] = [256];

#[derive(Debug, Default)]
struct Counters {
    requests: Counter,
    bytes: Counter,
    errors: Counter,
}

/// The virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    source: Arc<File>,
    counters: Arc<Counters>,
}

impl Rng {
    /// A device reading /dev/urandom (the same pool as getrandom(2), never blocking after boot).
    pub fn new() -> std::io::Result<Rng> {
        Ok(Rng {
            source: Arc::new(File::open("/dev/urandom")?),
            counters: Arc::default(),
        })
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn config(&self) -> &[u8] {
        &[]
    }

    fn activate(&mut self, a: Activation) -> Result<Worker, DeviceError> {
        let got = a.queues.len();
        let Ok([q]) = <[_; 1]>::try_from(a.queues) else {
            return Err(DeviceError::QueueCount { expected: 1, got });
        };
        let handler = RngHandler {
            mem: a.mem,
            queue: q.queue,
            source: Arc::clone(&self.source),
            counters: Arc::clone(&self.counters),
        };
        Worker::spawn("virtio-rng", handler, vec![q.event], a.interrupt)
            .map_err(DeviceError::Worker)
    }

    fn stats(&self) -> BTreeMap<String, u64> {
        let c = &self.counters;
        BTreeMap::from([
            ("requests".to_owned(), c.requests.get()),
            ("bytes".to_owned(), c.bytes.get()),
            ("errors".to_owned(), c.errors.get()),
        ])
    }
}

struct RngHandler {
    mem: GuestRam,
    queue: Queue,
    source: Arc<File>,
    counters: Arc<Counters>,
}

impl Handler for RngHandler {
    fn queue_event(&mut self, _index: usize) -> Result<Progress, QueueFault> {
        process(&mut self.queue, &self.mem, &self.source, &self.counters)
    }

    fn queues(&self) -> Vec<QueueState> {
        vec![self.queue.state()]
    }
}

fn process(
    queue: &mut Queue,
    mem: &GuestRam,
    source: &File,
    counters: &Counters,
) -> Result<Progress, QueueFault> {
    chain::serve_queue(queue, mem, |parsed| {
        counters.requests.inc();
        let len = parsed.ok().and_then(|c| fill(mem, &c, source, counters));
        if len.is_none() {
            counters.errors.inc();
        }
        len.unwrap_or(0)
    })
}

/// Fills the chain's buffers; `None` for a malformed request (device-readable buffers, bad
/// ranges), which gets nothing.
fn fill(mem: &GuestRam, c: &Chain, source: &File, counters: &Counters) -> Option<u32> {
    if c.fault.is_some() || !c.readable.is_empty() {
        return None;
    }
    let mut left = MAX_REQUEST;
    let mut written = 0u32;
    for seg in &c.writable {
        if left == 0 {
            break;
        }
        let n = u64::from(seg.len).min(left);
        let mut slice = mem.get_slice(seg.addr, n as usize).ok()?;
        let mut fd = source.as_fd();
        fd.read_exact_volatile(&mut slice).ok()?;
        left -= n;
        written += n as u32;
    }
    counters.bytes.add(u64::from(written));
    Some(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::chain::testing::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn run(q: &MockSplitQueue<GuestRam>, mem: &GuestRam) -> (Progress, Counters) {
        let source = File::open("/dev/urandom").unwrap();
        let counters = Counters::default();
        let mut queue = queue(q);
        let p = process(&mut queue, mem, &source, &counters).unwrap();
        (p, counters)
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        offer(&q, 0, &[wo(0x10_0000, 100), wo(0x20_0000, 28)]);
        let (p, counters) = run(&q, &mem);
        assert!(p.used);
        assert_eq!(used(&q, &mem, 0), (0, 128));
        let mut buf = [0u8; 100];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert!(buf.iter().any(|&b| b != 0), "random bytes written");
        assert_eq!(counters.bytes.get(), 128);
    }

    #[test]
    fn caps_the_bytes_of_one_request() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        offer(&q, 0, &[wo(0x10_0000, 1 << 20)]);
        let (_, counters) = run(&q, &mem);
        assert_eq!(used(&q, &mem, 0), (0, MAX_REQUEST as u32));
        let mut tail = [0u8; 64];
        mem.read_slice(&mut tail, GuestAddress(0x10_0000 + MAX_REQUEST))
            .unwrap();
        assert_eq!(tail, [0; 64], "nothing written past the cap");
        assert_eq!(counters.bytes.get(), MAX_REQUEST);
    }

    #[test]
    fn refuses_device_readable_buffers_and_still_returns_the_head() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        offer(&q, 0, &[ro(0x10_0000, 64)]);
        offer(&q, 1, &[wo(0x10_0000, 0)]);
        offer(&q, 2, &[wo(0xffff_0000, 64)]);
        let (_, counters) = run(&q, &mem);
        assert_eq!(used_idx(&q, &mem), 3);
        assert_eq!(used(&q, &mem, 0), (0, 0));
        assert_eq!(used(&q, &mem, 1), (1, 0), "zero-length buffer gets nothing");
        assert_eq!(used(&q, &mem, 2), (2, 0), "buffer outside guest memory");
        assert_eq!(counters.errors.get(), 2);
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(buf, [0; 64], "a device-readable buffer is never written");
    }
}
