//! Parsing and executing virtio-blk requests. Data moves straight between the image file and
//! guest memory (no bounce buffer), one descriptor at a time.

use crate::memory::GuestRam;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsFd;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{Queue, QueueState};
use vm_memory::{Bytes, GuestMemoryBackend, ReadVolatile, WriteVolatile};

use super::SECTOR_SIZE;
use crate::devices::chain::Progress;
use crate::devices::chain::{self, Chain, QueueFault, Segment};
use crate::devices::worker::Handler;
use crate::devices::Counter;

/// The open image.
#[derive(Debug)]
pub(super) struct Disk {
    pub file: File,
    pub sectors: u64,
    pub read_only: bool,
    pub id: [u8; 20],
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    requests: Counter,
    read_bytes: Counter,
    write_bytes: Counter,
    flushes: Counter,
    errors: Counter,
}

impl Counters {
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        BTreeMap::from([
            ("requests".to_owned(), self.requests.get()),
            ("read_bytes".to_owned(), self.read_bytes.get()),
            ("write_bytes".to_owned(), self.write_bytes.get()),
            ("flushes".to_owned(), self.flushes.get()),
            ("errors".to_owned(), self.errors.get()),
        ])
    }
}

pub(super) struct BlkHandler {
    pub mem: GuestRam,
    pub queue: Queue,
    pub disk: std::sync::Arc<Disk>,
    pub counters: std::sync::Arc<Counters>,
}

impl Handler for BlkHandler {
    fn queue_event(&mut self, _index: usize) -> Result<Progress, QueueFault> {
        process(&mut self.queue, &self.mem, &self.disk, &self.counters)
    }

    fn queues(&self) -> Vec<QueueState> {
        vec![self.queue.state()]
    }
}

/// A request that fails with a status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    IoErr,
    Unsupported,
}

impl Refused {
    fn status(self) -> u8 {
        match self {
            Refused::IoErr => VIRTIO_BLK_S_IOERR as u8,
            Refused::Unsupported => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

/// Serves up to one queue's worth of requests.
pub(super) fn process(
    queue: &mut Queue,
    mem: &GuestRam,
    disk: &Disk,
    counters: &Counters,
) -> Result<Progress, QueueFault> {
    chain::serve_queue(queue, mem, |parsed| {
        counters.requests.inc();
        match parsed {
            Ok(c) => execute(mem, &c, disk, counters),
            Err(_) => {
                counters.errors.inc();
                0
            }
        }
    })
}

/// Runs one request and writes its status; returns the bytes written to the guest (data plus
/// the status byte), 0 if there is no usable status byte.
fn execute(mem: &GuestRam, c: &Chain, disk: &Disk, counters: &Counters) -> u32 {
    let status_seg = if c.tail_writable {
        chain::split_last_byte(&c.writable)
    } else {
        None
    };
    let Some((data_out, status_addr)) = status_seg else {
        counters.errors.inc();
        return 0;
    };
    let (status, written) = match request(mem, c, &data_out, disk, counters) {
        Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
        Err(r) => {
            counters.errors.inc();
            (r.status(), 0)
        }
    };
    match mem.write_obj(status, status_addr) {
        Ok(()) => written + 1,
        Err(_) => 0,
    }
}

/// The byte range a data transfer of `len` bytes at `sector` covers, if inside the disk.
fn range(disk: &Disk, sector: u64, len: u64) -> Result<u64, Refused> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(Refused::IoErr);
    }
    let start = sector.checked_mul(SECTOR_SIZE).ok_or(Refused::IoErr)?;
    let end = start.checked_add(len).ok_or(Refused::IoErr)?;
    if end > disk.sectors * SECTOR_SIZE {
        return Err(Refused::IoErr);
    }
    Ok(start)
}

fn request(
    mem: &GuestRam,
    c: &Chain,
    data_out: &[Segment],
    disk: &Disk,
    counters: &Counters,
) -> Result<u32, Refused> {
    if c.fault.is_some() {
        return Err(Refused::IoErr);
    }
    let mut header = [0u8; 16];
    if !chain::read_prefix(mem, &c.readable, &mut header) {
        return Err(Refused::IoErr);
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let data_in = chain::skip(&c.readable, 16).ok_or(Refused::IoErr)?;
    let in_len: u64 = data_in.iter().map(|s| u64::from(s.len)).sum();
    let out_len: u64 = data_out.iter().map(|s| u64::from(s.len)).sum();
    let mut file = &disk.file;
    match kind {
        VIRTIO_BLK_T_IN => {
            // Data for a read must be device-writable, and nothing else device-readable.
            if in_len != 0 {
                return Err(Refused::IoErr);
            }
            let mut offset = range(disk, sector, out_len)?;
            for seg in data_out {
                let mut slice = mem
                    .get_slice(seg.addr, seg.len as usize)
                    .map_err(|_| Refused::IoErr)?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(|_| Refused::IoErr)?;
                file.as_fd()
                    .read_exact_volatile(&mut slice)
                    .map_err(|_| Refused::IoErr)?;
                offset += u64::from(seg.len);
            }
            counters.read_bytes.add(out_len);
            Ok(out_len as u32)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only || out_len != 0 {
                return Err(Refused::IoErr);
            }
            let mut offset = range(disk, sector, in_len)?;
            for seg in &data_in {
                let slice = mem
                    .get_slice(seg.addr, seg.len as usize)
                    .map_err(|_| Refused::IoErr)?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(|_| Refused::IoErr)?;
                file.as_fd()
                    .write_all_volatile(&slice)
                    .map_err(|_| Refused::IoErr)?;
                offset += u64::from(seg.len);
            }
            counters.write_bytes.add(in_len);
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if in_len != 0 || out_len != 0 {
                return Err(Refused::IoErr);
            }
            if !disk.read_only {
                disk.file.sync_data().map_err(|_| Refused::IoErr)?;
            }
            counters.flushes.inc();
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            if in_len != 0 {
                return Err(Refused::IoErr);
            }
            let n = chain::scatter(mem, data_out, &disk.id).ok_or(Refused::IoErr)?;
            Ok(n as u32)
        }
        _ => Err(Refused::Unsupported),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::chain::testing::*;
    use std::io::{Read, Write};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    struct Fixture {
        dir: std::path::PathBuf,
        disk: Disk,
        counters: Counters,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A 16-sector image whose sector `i` is filled with byte `i`.
    fn fixture(name: &str, read_only: bool) -> Fixture {
        let dir = std::env::temp_dir().join(format!("hvnode-blk-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        let mut f = File::create(&path).unwrap();
        for i in 0..16u8 {
            f.write_all(&[i; 512]).unwrap();
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .unwrap();
        let mut id = [0u8; 20];
        id[..8].copy_from_slice(b"disk.img");
        Fixture {
            dir,
            disk: Disk {
                file,
                sectors: 16,
                read_only,
                id,
            },
            counters: Counters::default(),
        }
    }

    fn header(mem: &GuestRam, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn run(f: &Fixture, q: &MockSplitQueue<GuestRam>, mem: &GuestRam) {
        let mut queue = queue(q);
        let p = process(&mut queue, mem, &f.disk, &f.counters).unwrap();
        assert!(p.used);
    }

    fn status(mem: &GuestRam) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn reads_sectors_into_split_guest_buffers() {
        let f = fixture("read", false);
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        header(&mem, VIRTIO_BLK_T_IN, 3);
        offer(
            &q,
            0,
            &[
                ro(HDR, 16),
                wo(DATA, 512),
                wo(DATA + 0x1000, 512),
                wo(STATUS, 1),
            ],
        );
        run(&f, &q, &mem);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(used(&q, &mem, 0), (0, 1025));
        let mut a = [0u8; 512];
        mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
        assert_eq!(a, [3; 512]);
        mem.read_slice(&mut a, GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(a, [4; 512]);
        assert_eq!(f.counters.read_bytes.get(), 1024);
    }

    #[test]
    fn a_request_posted_while_paused_is_served_after_resume() {
        use crate::devices::worker::Worker;
        use crate::devices::Interrupt;
        use std::sync::Arc;
        use std::time::{Duration, Instant};
        use vmm_sys_util::eventfd::EventFd;

        let f = fixture("paused", false);
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        let handler = BlkHandler {
            mem: mem.clone(),
            queue: queue(&q),
            disk: Arc::new(Disk {
                file: f.disk.file.try_clone().unwrap(),
                ..f.disk
            }),
            counters: Arc::default(),
        };
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let mut worker = Worker::spawn(
            "test-blk",
            handler,
            vec![notify.try_clone().unwrap()],
            interrupt,
        )
        .unwrap();
        worker
            .pause(Instant::now() + Duration::from_secs(5))
            .unwrap();
        // The driver posts a read of sector 5 and notifies, as KVM's ioeventfd would.
        header(&mem, VIRTIO_BLK_T_IN, 5);
        offer(&q, 0, &[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]);
        notify.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(used_idx(&q, &mem), 0, "served while paused");
        assert_eq!(status(&mem), 0xff);
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data, [0; 512], "guest memory changed while paused");
        assert!(irq.read().is_err(), "no interrupt while paused");
        worker.resume();
        wait_for("the request after resume", || used_idx(&q, &mem) == 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data, [5; 512]);
        assert_eq!(irq.read().unwrap(), 1);
        worker.stop();
    }

    #[test]
    fn writes_sectors_to_the_image_and_flushes() {
        let f = fixture("write", false);
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 14);
        offer(&q, 0, &[ro(HDR, 16), ro(DATA, 1024), wo(STATUS, 1)]);
        run(&f, &q, &mem);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(used(&q, &mem, 0), (0, 1));
        let mut img = Vec::new();
        File::open(f.dir.join("disk.img"))
            .unwrap()
            .read_to_end(&mut img)
            .unwrap();
        assert_eq!(img.len(), 16 * 512, "the image never grows");
        assert!(img[14 * 512..].iter().all(|&b| b == 0xab));
        assert!(img[13 * 512..14 * 512].iter().all(|&b| b == 13));
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        offer(&q, 3, &[ro(HDR, 16), wo(STATUS, 1)]);
        let mut queue = queue(&q);
        queue.set_next_avail(1);
        queue.set_next_used(1);
        process(&mut queue, &mem, &f.disk, &f.counters).unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(f.counters.flushes.get(), 1);
        assert_eq!(f.counters.write_bytes.get(), 1024);
    }

    #[test]
    fn get_id_returns_the_serial_from_the_file_name() {
        let f = fixture("getid", true);
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        offer(&q, 0, &[ro(HDR, 16), wo(DATA, 20), wo(STATUS, 1)]);
        run(&f, &q, &mem);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        let mut id = [0xffu8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..8], b"disk.img");
        assert_eq!(id[8..], [0; 12]);
        assert_eq!(used(&q, &mem, 0), (0, 21));
    }

    #[test]
    fn refuses_a_write_to_a_read_only_disk() {
        let f = fixture("ro", true);
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        offer(&q, 0, &[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]);
        run(&f, &q, &mem);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(used(&q, &mem, 0), (0, 1));
        let mut img = vec![];
        File::open(f.dir.join("disk.img"))
            .unwrap()
            .read_to_end(&mut img)
            .unwrap();
        assert!(img[..512].iter().all(|&b| b == 0));
        assert_eq!(f.counters.errors.get(), 1);
    }

    #[test]
    fn refuses_sectors_beyond_capacity_and_overflowing_sector_numbers() {
        let f = fixture("beyond", false);
        let mem = memory();
        for sector in [15, 16, u64::MAX / 512 + 1, u64::MAX] {
            let q = MockSplitQueue::new(&mem, 16);
            header(&mem, VIRTIO_BLK_T_IN, sector);
            offer(&q, 0, &[ro(HDR, 16), wo(DATA, 1024), wo(STATUS, 1)]);
            run(&f, &q, &mem);
            assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8, "sector {sector}");
            assert_eq!(used(&q, &mem, 0), (0, 1));
        }
    }

    #[test]
    fn refuses_data_in_the_wrong_direction_and_partial_sectors() {
        let f = fixture("direction", false);
        let mem = memory();
        let cases: [(u32, Vec<_>); 3] = [
            // A read whose data buffer is device-readable.
            (
                VIRTIO_BLK_T_IN,
                vec![ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)],
            ),
            // A write whose data buffer is device-writable.
            (
                VIRTIO_BLK_T_OUT,
                vec![ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)],
            ),
            (
                VIRTIO_BLK_T_IN,
                vec![ro(HDR, 16), wo(DATA, 100), wo(STATUS, 1)],
            ),
        ];
        for (kind, descs) in cases {
            let q = MockSplitQueue::new(&mem, 16);
            header(&mem, kind, 0);
            offer(&q, 0, &descs);
            run(&f, &q, &mem);
            assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8, "{descs:?}");
        }
        let q = MockSplitQueue::new(&mem, 16);
        header(&mem, 99, 0);
        offer(&q, 0, &[ro(HDR, 16), wo(STATUS, 1)]);
        run(&f, &q, &mem);
        assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn answers_malformed_chains_and_keeps_serving_the_queue() {
        let f = fixture("malformed", false);
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // No status descriptor at all: returned with len 0.
        offer(&q, 0, &[ro(HDR, 16)]);
        // Header too short.
        offer(&q, 1, &[ro(HDR, 8), wo(STATUS, 1)]);
        // A data buffer outside guest memory and a huge length.
        offer(&q, 3, &[ro(HDR, 16), wo(0xffff_0000, 512), wo(STATUS, 1)]);
        offer(
            &q,
            6,
            &[ro(HDR, 16), wo(DATA, u32::MAX - 17), wo(STATUS, 1)],
        );
        // Writable before readable.
        offer(&q, 9, &[wo(DATA, 512), ro(HDR, 16), wo(STATUS, 1)]);
        // A good read still works after all of them.
        offer(&q, 12, &[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]);
        let mut queue = queue(&q);
        process(&mut queue, &mem, &f.disk, &f.counters).unwrap();
        assert_eq!(used_idx(&q, &mem), 6);
        assert_eq!(used(&q, &mem, 0), (0, 0));
        for (i, head) in [(1, 1), (2, 3), (3, 6), (4, 9)] {
            assert_eq!(used(&q, &mem, i), (head, 1), "status only");
        }
        assert_eq!(used(&q, &mem, 5), (12, 513));
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(f.counters.errors.get(), 5);
        assert_eq!(f.counters.requests.get(), 6);
    }

    #[test]
    fn a_looping_chain_is_returned_with_no_status() {
        let f = fixture("loop", false);
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 4);
        let next = |i: u16| {
            virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
                HDR,
                16,
                VRING_DESC_F_NEXT as u16,
                i,
            ))
        };
        offer_raw(&q, 0, &[next(1), next(0)]);
        run(&f, &q, &mem);
        assert_eq!(used(&q, &mem, 0), (0, 0));
        assert_eq!(f.counters.errors.get(), 1);
    }
}
