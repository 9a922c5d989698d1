//! Taking descriptor chains off a queue and checking them before any I/O.
//!
//! virtio-queue's iterator already stops after `queue size` descriptors (a loop or an overlong
//! chain cannot spin), refuses nested indirect tables and chains over 4 GiB in total; but it ends
//! such a chain silently, as if it were complete. [`parse`] notices that (the last descriptor it
//! got still had NEXT set) and refuses the chain, checks every descriptor's range against guest
//! memory, and checks that device-readable descriptors come before device-writable ones.

use crate::memory::GuestRam;
use std::ops::Deref;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// A guest buffer: one descriptor's address and length, checked to lie in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Why a chain cannot be used as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChainError {
    /// The chain loops, is longer than the queue, or points past the descriptor table.
    #[error("Descriptor chain loops or is longer than the queue")]
    Unterminated,
    /// A descriptor's buffer is not in guest memory.
    #[error("Descriptor buffer {0:#x}+{1} is outside guest memory")]
    OutOfRange(u64, u32),
    /// A device-readable descriptor follows a device-writable one.
    #[error("Device-readable descriptor after a device-writable one")]
    Order,
}

/// What one call of a handler (or one pass of [`serve_queue`]) did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Entries were added to a used ring: the guest needs an interrupt.
    pub used: bool,
    /// The handler stopped at its budget with chains left: call it again after other events.
    pub more: bool,
}

/// A queue error that leaves the queue unusable: the device needs a reset.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueFault {
    /// The available index moved by more than the queue size.
    #[error("Available ring: {0}")]
    Avail(virtio_queue::Error),
    /// A head index outside the descriptor table, which cannot be returned to the used ring.
    #[error("Descriptor head {0} is outside a queue of {1}")]
    Head(u16, u16),
    /// The used ring could not be written.
    #[error("Used ring: {0}")]
    Used(virtio_queue::Error),
}

/// A checked descriptor chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Chain {
    /// The head index, to return to the used ring.
    pub head: u16,
    /// Device-readable buffers, in chain order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in chain order.
    pub writable: Vec<Segment>,
    /// Set when a buffer is out of range or the directions are out of order; the segments
    /// that passed are kept so that a device can still write a status byte.
    pub fault: Option<ChainError>,
    /// The chain's last descriptor is device-writable, non-empty and in guest memory: it is
    /// `writable.last()`, and a status byte can go in its last byte.
    pub tail_writable: bool,
}

impl Chain {
    /// Total bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Takes the next available chain off `queue`, or `None` when the driver has offered no more.
pub(crate) fn pop<'a>(
    queue: &mut Queue,
    mem: &'a GuestRam,
) -> Result<Option<DescriptorChain<&'a GuestRam>>, QueueFault> {
    let size = queue.size();
    let next = queue.iter(mem).map_err(QueueFault::Avail)?.next();
    match next {
        Some(c) if c.head_index() >= size => Err(QueueFault::Head(c.head_index(), size)),
        other => Ok(other),
    }
}

/// Serves up to one queue's worth of requests of a device that answers each chain at once:
/// `serve` gets the chain parsed (or why it is malformed) and returns the bytes it wrote to the
/// guest; the head goes back to the used ring whatever happened.
pub(crate) fn serve_queue(
    queue: &mut Queue,
    mem: &GuestRam,
    mut serve: impl FnMut(Result<Chain, ChainError>) -> u32,
) -> Result<Progress, QueueFault> {
    let mut progress = Progress::default();
    for _ in 0..queue.size() {
        let Some(c) = pop(queue, mem)? else {
            return Ok(progress);
        };
        let head = c.head_index();
        let len = serve(parse(c));
        complete(queue, mem, head, len)?;
        progress.used = true;
    }
    progress.more = true;
    Ok(progress)
}

/// Returns a chain's head to the used ring with `len` bytes written.
pub(crate) fn complete(
    queue: &mut Queue,
    mem: &GuestRam,
    head: u16,
    len: u32,
) -> Result<(), QueueFault> {
    queue.add_used(mem, head, len).map_err(QueueFault::Used)
}

/// Walks and checks `chain`. `Err` only for a chain that does not end; other faults are kept in
/// [`Chain::fault`].
pub(crate) fn parse<M>(mut chain: DescriptorChain<M>) -> Result<Chain, ChainError>
where
    M: Deref<Target = GuestRam>,
{
    let mut out = Chain {
        head: chain.head_index(),
        ..Chain::default()
    };
    let mut last_has_next = true;
    let mut descs = Vec::new();
    for d in chain.by_ref() {
        last_has_next = d.has_next();
        descs.push(d);
    }
    if descs.is_empty() || last_has_next {
        return Err(ChainError::Unterminated);
    }
    let mem: &GuestRam = chain.memory();
    let mut seen_writable = false;
    let last = descs.len() - 1;
    for (i, d) in descs.into_iter().enumerate() {
        let seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            out.fault.get_or_insert(ChainError::Order);
        }
        if seg.len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, seg.addr, seg.len as usize) {
            out.fault
                .get_or_insert(ChainError::OutOfRange(seg.addr.0, seg.len));
            continue;
        }
        if d.is_write_only() {
            out.tail_writable = i == last;
            out.writable.push(seg);
        } else {
            out.readable.push(seg);
        }
    }
    Ok(out)
}

/// `segs` without their first `n` bytes; `None` if they hold fewer.
pub(crate) fn skip(segs: &[Segment], mut n: u64) -> Option<Vec<Segment>> {
    let mut out = Vec::new();
    for s in segs {
        let len = u64::from(s.len);
        if n >= len {
            n -= len;
            continue;
        }
        out.push(Segment {
            addr: s.addr.unchecked_add(n),
            len: (len - n) as u32,
        });
        n = 0;
    }
    (n == 0).then_some(out)
}

/// `segs` without their last byte, and that byte's address.
pub(crate) fn split_last_byte(segs: &[Segment]) -> Option<(Vec<Segment>, GuestAddress)> {
    let (last, rest) = segs.split_last()?;
    let mut out = rest.to_vec();
    let status = last.addr.unchecked_add(u64::from(last.len) - 1);
    if last.len > 1 {
        out.push(Segment {
            addr: last.addr,
            len: last.len - 1,
        });
    }
    Some((out, status))
}

/// Fills `buf` from the start of `segs`; `false` if they hold fewer bytes or memory fails.
pub(crate) fn read_prefix(mem: &GuestRam, segs: &[Segment], buf: &mut [u8]) -> bool {
    let mut done = 0;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - done);
        if mem.read_slice(&mut buf[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// Copies as much of `data` as fits into `segs`; the bytes written, or `None` if memory fails.
pub(crate) fn scatter(mem: &GuestRam, segs: &[Segment], data: &[u8]) -> Option<usize> {
    let mut done = 0;
    for s in segs {
        if done == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + n], s.addr).ok()?;
        done += n;
    }
    Some(done)
}

/// Test helpers shared by the device tests: guest memory and a driver-side queue.
#[cfg(test)]
pub(crate) mod testing {
    use crate::memory::GuestRam;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    pub use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    /// 16 MiB of guest memory at 0.
    pub fn memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    /// Guest memory with a hole, as a guest larger than 3 GiB has: 16 MiB at 0 and 16 MiB at
    /// [`HIGH`].
    pub fn two_regions() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20), (GuestAddress(HIGH), 16 << 20)])
            .unwrap()
    }

    /// Start of the second region of [`two_regions`].
    pub const HIGH: u64 = 32 << 20;

    /// A readable descriptor.
    pub fn ro(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, 0, 0))
    }

    /// A writable descriptor.
    pub fn wo(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
    }

    /// Writes `descs` as one chain at descriptor `offset` (NEXT links set here) and offers it.
    pub fn offer(q: &MockSplitQueue<GuestRam>, offset: u16, descs: &[RawDescriptor]) {
        let linked: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = Descriptor::from(*d);
                let last = i + 1 == descs.len();
                let flags = if last {
                    d.flags() & !(VRING_DESC_F_NEXT as u16)
                } else {
                    d.flags() | VRING_DESC_F_NEXT as u16
                };
                let next = if last { 0 } else { offset + i as u16 + 1 };
                RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), flags, next))
            })
            .collect();
        q.add_desc_chains(&linked, offset).unwrap();
    }

    /// Offers descriptors exactly as given (no NEXT fix-up), for malformed chains; the tests
    /// never offer more chains than the queue holds, so the ring index needs no wrap.
    pub fn offer_raw(q: &MockSplitQueue<GuestRam>, offset: u16, descs: &[RawDescriptor]) {
        for (i, d) in descs.iter().enumerate() {
            q.desc_table().store(offset + i as u16, *d).unwrap();
        }
        let idx = q.avail().idx().load();
        q.avail()
            .ring()
            .ref_at(usize::from(idx))
            .unwrap()
            .store(offset);
        q.avail().idx().store(idx.wrapping_add(1));
    }

    /// The device-side queue for the mock.
    pub fn queue(q: &MockSplitQueue<GuestRam>) -> Queue {
        q.create_queue::<Queue>().unwrap()
    }

    /// The `(id, len)` of used ring entry `i`.
    pub fn used(q: &MockSplitQueue<GuestRam>, mem: &GuestRam, i: u16) -> (u32, u32) {
        let base = q.used_addr().0 + 4 + 8 * u64::from(i);
        (
            mem.read_obj(GuestAddress(base)).unwrap(),
            mem.read_obj(GuestAddress(base + 4)).unwrap(),
        )
    }

    /// Waits up to 5 s for `done`, failing the test with `what` after that.
    pub fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The used ring's idx.
    pub fn used_idx(q: &MockSplitQueue<GuestRam>, mem: &GuestRam) -> u16 {
        mem.read_obj(GuestAddress(q.used_addr().0 + 2)).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    fn parse_first(q: &MockSplitQueue<GuestRam>, mem: &GuestRam) -> Result<Chain, ChainError> {
        let mut queue = queue(q);
        let c = pop(&mut queue, mem).unwrap().unwrap();
        parse(c)
    }

    #[test]
    fn splits_a_chain_into_readable_and_writable_segments() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        offer(
            &q,
            0,
            &[ro(0x10_0000, 16), wo(0x20_0000, 512), wo(0x30_0000, 1)],
        );
        let c = parse_first(&q, &mem).unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.fault, None);
        assert_eq!(c.readable_len(), 16);
        assert_eq!(c.writable_len(), 513);
        assert_eq!(c.writable[1].addr, GuestAddress(0x30_0000));
    }

    #[test]
    fn skips_and_splits_segments_across_descriptor_boundaries() {
        let seg = |a: u64, l: u32| Segment {
            addr: GuestAddress(a),
            len: l,
        };
        let segs = [seg(0x1000, 10), seg(0x2000, 10)];
        assert_eq!(skip(&segs, 12), Some(vec![seg(0x2002, 8)]));
        assert_eq!(skip(&segs, 20), Some(vec![]));
        assert_eq!(skip(&segs, 21), None);
        assert_eq!(
            split_last_byte(&segs),
            Some((vec![seg(0x1000, 10), seg(0x2000, 9)], GuestAddress(0x2009)))
        );
        assert_eq!(
            split_last_byte(&[seg(0x3000, 1)]),
            Some((vec![], GuestAddress(0x3000)))
        );
        let mem = memory();
        assert_eq!(scatter(&mem, &segs, &[7u8; 15]), Some(15));
        let mut buf = [0u8; 15];
        assert!(read_prefix(&mem, &segs, &mut buf));
        assert_eq!(buf, [7; 15]);
        assert!(!read_prefix(&mem, &segs, &mut [0u8; 21]));
    }

    #[test]
    fn rejects_a_descriptor_loop() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        let looped = |i: u16| {
            RawDescriptor::from(Descriptor::new(0x10_0000, 16, VRING_DESC_F_NEXT as u16, i))
        };
        offer_raw(&q, 0, &[looped(1), looped(0)]);
        assert_eq!(parse_first(&q, &mem), Err(ChainError::Unterminated));
    }

    #[test]
    fn rejects_descriptor_chain_longer_than_queue() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 4);
        // Four linked descriptors whose last still says NEXT (to index 0): five would be needed.
        let d: Vec<RawDescriptor> = (0..4u16)
            .map(|i| {
                RawDescriptor::from(Descriptor::new(
                    0x10_0000,
                    8,
                    VRING_DESC_F_NEXT as u16,
                    (i + 1) % 4,
                ))
            })
            .collect();
        offer_raw(&q, 0, &d);
        assert_eq!(parse_first(&q, &mem), Err(ChainError::Unterminated));
    }

    #[test]
    fn rejects_next_index_past_the_table() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 4);
        offer_raw(
            &q,
            0,
            &[RawDescriptor::from(Descriptor::new(
                0x10_0000,
                8,
                VRING_DESC_F_NEXT as u16,
                200,
            ))],
        );
        assert_eq!(parse_first(&q, &mem), Err(ChainError::Unterminated));
    }

    #[test]
    fn flags_buffers_outside_guest_memory_and_huge_lengths() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        offer(&q, 0, &[ro(0x4000_0000, 16), wo(0x30_0000, 1)]);
        offer(&q, 2, &[ro(0x10_0000, u32::MAX - 1), wo(0x30_0000, 1)]);
        let mut queue = queue(&q);
        for addr in [0x4000_0000u64, 0x10_0000] {
            let c = parse(pop(&mut queue, &mem).unwrap().unwrap()).unwrap();
            assert!(
                matches!(c.fault, Some(ChainError::OutOfRange(a, _)) if a == addr),
                "{c:?}"
            );
            assert!(c.readable.is_empty());
            assert_eq!(c.writable.len(), 1, "the status buffer survives");
        }
    }

    #[test]
    fn rejects_a_chain_over_4_gib_in_total() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        offer(&q, 0, &[ro(0x10_0000, u32::MAX), wo(0x30_0000, 1)]);
        assert_eq!(parse_first(&q, &mem), Err(ChainError::Unterminated));
    }

    #[test]
    fn skips_zero_length_buffers() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        offer(&q, 0, &[ro(0x10_0000, 0), wo(0x30_0000, 4)]);
        let c = parse_first(&q, &mem).unwrap();
        assert!(c.readable.is_empty());
        assert_eq!(c.fault, None);
    }

    #[test]
    fn flags_readable_after_writable() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        offer(&q, 0, &[wo(0x20_0000, 8), ro(0x10_0000, 16)]);
        assert_eq!(
            parse_first(&q, &mem).unwrap().fault,
            Some(ChainError::Order)
        );
    }

    #[test]
    fn refuses_a_buffer_that_runs_off_a_region_into_the_hole() {
        let mem = two_regions();
        let low_end = 16u64 << 20;
        // The queue itself lives in the second region.
        let q = MockSplitQueue::create(&mem, GuestAddress(HIGH), 16);
        offer(&q, 0, &[ro(low_end - 8, 16), wo(HIGH + 0x1_0000, 1)]);
        offer(
            &q,
            2,
            &[ro(HIGH + (16 << 20) - 8, 16), wo(HIGH + 0x1_0000, 1)],
        );
        offer(&q, 4, &[ro(low_end - 16, 16), wo(HIGH + 0x1_0000, 1)]);
        offer(&q, 6, &[ro(HIGH, 4096), wo(HIGH + (16 << 20) - 1, 1)]);
        let mut queue = queue(&q);
        assert!(queue.is_valid(&mem));
        for addr in [low_end - 8, HIGH + (16 << 20) - 8] {
            let c = parse(pop(&mut queue, &mem).unwrap().unwrap()).unwrap();
            assert_eq!(c.fault, Some(ChainError::OutOfRange(addr, 16)), "{c:?}");
            assert!(c.readable.is_empty());
            assert!(
                c.tail_writable,
                "the status byte in the second region survives"
            );
        }
        // Up to the last byte of either region is fine.
        for _ in 0..2 {
            let c = parse(pop(&mut queue, &mem).unwrap().unwrap()).unwrap();
            assert_eq!(c.fault, None, "{c:?}");
            assert_eq!(c.readable.len(), 1);
        }
    }

    #[test]
    fn a_head_outside_the_table_is_a_queue_fault() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 4);
        q.avail().ring().ref_at(0).unwrap().store(9);
        q.avail().idx().store(1);
        let mut queue = queue(&q);
        assert!(matches!(pop(&mut queue, &mem), Err(QueueFault::Head(9, 4))));
    }

    #[test]
    fn an_avail_index_beyond_the_queue_size_is_a_queue_fault() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 4);
        q.avail().idx().store(100);
        let mut queue = queue(&q);
        assert!(matches!(pop(&mut queue, &mem), Err(QueueFault::Avail(_))));
    }
}
