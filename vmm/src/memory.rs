//! Guest RAM, its KVM memory slots, and the record of which pages were written since a given
//! moment (dirty page tracking, for live migration).
//!
//! Two writers change guest memory: the guest itself (its vCPUs, and KVM on its behalf) and the
//! VMM (virtio-blk reads, virtio-net receive, the used rings, the serial port never). KVM logs
//! the first per memory slot once the slot carries `KVM_MEM_LOG_DIRTY_PAGES`
//! (`KVM_GET_DIRTY_LOG` returns and clears it); vm-memory logs the second in each region's
//! [`AtomicBitmap`], marked by every write through its `Bytes`/volatile API, which is the only
//! way the devices touch guest memory. A page is dirty if either says so.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest RAM: anonymous or file-backed mappings, each with the bitmap of the VMM's own writes.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// The page size of both dirty logs.
pub const PAGE: u64 = 4096;

/// Registers each region of `mem` with KVM as its own memory slot (slot = region index), with
/// dirty logging on or off. Registering a slot again with other flags changes only its flags.
pub fn register(vm: &VmFd, mem: &GuestRam, log_dirty: bool) -> Result<(), kvm_ioctls::Error> {
    for (slot, region) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the slot is exactly one mmap of `mem`, which lives until the process exits
        // (the VM builder leaks it: vCPU threads run until then).
        unsafe { vm.set_user_memory_region(region)? };
    }
    Ok(())
}

/// The dirty pages of one region: bit `i` of the bitmap (64 pages a word) is the page at
/// `start + i * PAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyRegion {
    /// Guest address of the region.
    pub start: u64,
    /// Region length in bytes.
    pub len: u64,
    /// One bit per page.
    pub bitmap: Vec<u64>,
}

impl DirtyRegion {
    /// Dirty bytes in the region.
    pub fn bytes(&self) -> u64 {
        self.bitmap
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>()
            * PAGE
    }

    /// The dirty pages as `(guest address, length)` runs of adjacent pages, clipped to the
    /// region.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let pages = self.len.div_ceil(PAGE);
        let mut runs = Vec::new();
        let mut run: Option<(u64, u64)> = None;
        for (w, &word) in self.bitmap.iter().enumerate() {
            if word == 0 {
                if let Some(r) = run.take() {
                    runs.push(r);
                }
                continue;
            }
            for bit in 0..64 {
                let page = w as u64 * 64 + bit;
                if page >= pages {
                    break;
                }
                if word & (1 << bit) != 0 {
                    run = match run {
                        Some((at, n)) => Some((at, n + 1)),
                        None => Some((page, 1)),
                    };
                } else if let Some(r) = run.take() {
                    runs.push(r);
                }
            }
        }
        runs.extend(run);
        runs.into_iter()
            .map(|(page, n)| {
                let at = page * PAGE;
                (self.start + at, (n * PAGE).min(self.len - at))
            })
            .collect()
    }
}

/// Dirty page tracking over all of guest memory, from [`DirtyLog::start`] to
/// [`DirtyLog::stop`].
#[derive(Debug)]
pub struct DirtyLog<'a> {
    vm: &'a VmFd,
    mem: &'a GuestRam,
    on: bool,
}

impl<'a> DirtyLog<'a> {
    /// Turns KVM's dirty logging on for every slot and clears the VMM's own record, so that
    /// from now on every write to guest memory is seen by [`DirtyLog::take`].
    pub fn start(vm: &'a VmFd, mem: &'a GuestRam) -> Result<Self, kvm_ioctls::Error> {
        register(vm, mem, true)?;
        for region in mem.iter() {
            region.bitmap_mut_ref().reset();
        }
        Ok(DirtyLog { vm, mem, on: true })
    }

    /// The pages written since the last call (or since `start`), each region's KVM log OR-ed
    /// with the VMM's own record; both are cleared.
    pub fn take(&self) -> Result<Vec<DirtyRegion>, kvm_ioctls::Error> {
        self.mem
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let len = region.len();
                let mut bitmap = self.vm.get_dirty_log(slot as u32, len as usize)?;
                let own = region.bitmap_mut_ref().get_and_reset();
                for (w, o) in bitmap.iter_mut().zip(own) {
                    *w |= o;
                }
                Ok(DirtyRegion {
                    start: region.start_addr().0,
                    len,
                    bitmap,
                })
            })
            .collect()
    }

    /// Turns KVM's dirty logging off again (it costs the guest a fault on its first write to
    /// each page after every `take`).
    pub fn stop(mut self) -> Result<(), kvm_ioctls::Error> {
        self.on = false;
        register(self.vm, self.mem, false)
    }
}

impl Drop for DirtyLog<'_> {
    fn drop(&mut self) {
        if self.on {
            let _ = register(self.vm, self.mem, false);
        }
    }
}

/// The region's bitmap of the VMM's writes.
trait OwnBitmap {
    fn bitmap_mut_ref(&self) -> &AtomicBitmap;
}

impl OwnBitmap for vm_memory::GuestRegionMmap<AtomicBitmap> {
    fn bitmap_mut_ref(&self) -> &AtomicBitmap {
        vm_memory::MmapRegion::bitmap(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn runs_merge_adjacent_pages_and_stop_at_the_region_end() {
        let r = DirtyRegion {
            start: 0x10_0000,
            len: 70 * PAGE,
            bitmap: vec![0b1011 | 1 << 63, 0b11 | 1 << 9],
        };
        assert_eq!(
            r.runs(),
            vec![
                (0x10_0000, 2 * PAGE),
                (0x10_0000 + 3 * PAGE, PAGE),
                (0x10_0000 + 63 * PAGE, 3 * PAGE),
            ],
            "bit 73 lies past the region's 70 pages"
        );
        assert_eq!(r.bytes(), 7 * PAGE);
        let empty = DirtyRegion {
            start: 0,
            len: 64 * PAGE,
            bitmap: vec![0],
        };
        assert!(empty.runs().is_empty());
        let full = DirtyRegion {
            start: 0,
            len: 128 * PAGE,
            bitmap: vec![u64::MAX, u64::MAX],
        };
        assert_eq!(full.runs(), vec![(0, 128 * PAGE)]);
    }

    #[test]
    fn the_vmms_own_writes_are_recorded_per_page() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let region = mem.iter().next().unwrap();
        region.bitmap_mut_ref().reset();
        mem.write_obj(1u32, GuestAddress(5 * PAGE + 8)).unwrap();
        mem.write_slice(&[1; 10], GuestAddress(9 * PAGE - 2))
            .unwrap();
        let bits = region.bitmap_mut_ref().get_and_reset();
        assert_eq!(bits[0], 1 << 5 | 1 << 8 | 1 << 9);
        assert_eq!(region.bitmap_mut_ref().get_and_reset()[0], 0);
    }
}
