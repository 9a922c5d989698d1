//! The sending side: pre-copy while the guest runs, then the switchover.
//!
//! 1. `start`: the destination checks the config and answers.
//! 2. Dirty logging on; pass 0 sends every page that is not all zeros (the destination's memory
//!    is fresh, so zero pages need not travel).
//! 3. Each further pass sends what was dirtied during the one before, until [`decide`] says the
//!    rest fits in the downtime limit at the bandwidth measured so far (or gives up: too many
//!    passes, too long, cancelled: the guest never stopped).
//! 4. Switchover: pause; the last pass; the device state; `state`, `complete`; the destination
//!    restores and answers `ok` once its vCPUs run. Only then is the migration done; the guest
//!    here stays paused for good.
//!
//! Any failure before `complete` is sent resumes the guest here, unharmed. After `complete`,
//! an `error` answer means the destination did not start it (resume here); no answer at all
//! (the connection broke, the destination died) leaves it unknown whether the guest runs there,
//! so it stays paused here and the status says so: resuming could run it twice.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hvnode_api::vmm::{MigrationPhase, MigrationResult, MigrationStatus, VmConfig};
use kvm_ioctls::VmFd;
use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{self, Complete, Kind, ProtocolError, Range, Refusal, Resumed, Start};
use crate::memory::{DirtyLog, GuestRam, PAGE};

/// The limits of one migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest pause allowed.
    pub downtime: Duration,
    /// Most passes (pass 0 included).
    pub max_passes: u32,
    /// Longest the pre-copy may take.
    pub timeout: Duration,
}

/// What the next step is after a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Another pass.
    Continue,
    /// Pause and finish.
    Switchover,
    /// Stop trying: the guest stays here. The reason says what to change.
    GiveUp(String),
}

/// The convergence rule: switch over when what is left (`left` bytes) can be sent within the
/// downtime limit at `bandwidth` (bytes per second), else go on until the pass limit or the
/// timeout. `passes` counts the passes done.
pub fn decide(
    passes: u32,
    left: u64,
    bandwidth: u64,
    elapsed: Duration,
    limits: &Limits,
) -> Decision {
    let expected = expected_downtime(left, bandwidth);
    if left == 0 || expected <= limits.downtime {
        return Decision::Switchover;
    }
    let why = |what: String| {
        Decision::GiveUp(format!(
            "{what}: {} MiB still dirty after pass {}, {} MiB/s measured, an expected downtime of \
             {} ms above the limit of {} ms; raise the downtime limit, or migrate when the guest \
             writes less",
            left >> 20,
            passes.saturating_sub(1),
            bandwidth >> 20,
            expected.as_millis(),
            limits.downtime.as_millis()
        ))
    };
    if passes >= limits.max_passes {
        return why(format!("did not converge in {} passes", limits.max_passes));
    }
    if elapsed >= limits.timeout {
        return why(format!(
            "did not converge in {} s",
            limits.timeout.as_secs()
        ));
    }
    Decision::Continue
}

/// How long sending `left` bytes takes at `bandwidth` bytes per second.
pub fn expected_downtime(left: u64, bandwidth: u64) -> Duration {
    if left == 0 {
        return Duration::ZERO;
    }
    if bandwidth == 0 {
        return Duration::MAX;
    }
    Duration::from_micros(
        ((left as u128 * 1_000_000) / bandwidth as u128).min(u64::MAX as u128) as u64,
    )
}

/// `bytes` over `time`, in bytes per second.
pub fn per_second(bytes: u64, time: Duration) -> u64 {
    (bytes as u128 * 1_000_000 / time.as_micros().max(1)).min(u64::MAX as u128) as u64
}

/// What the sender needs of the VM beyond memory.
pub trait Source {
    /// The guest's config.
    fn config(&self) -> &VmConfig;
    /// The VM, for dirty logging.
    fn vm(&self) -> &VmFd;
    /// Guest memory.
    fn memory(&self) -> &GuestRam;
    /// Guest memory size in bytes.
    fn memory_bytes(&self) -> u64;
    /// Parks the vCPUs and the device workers.
    fn pause(&self) -> Result<(), String>;
    /// Lets them run again.
    fn resume(&self);
    /// Flushes the disks and reads the paused VM's state, encoded as a state file.
    fn state(&self) -> Result<Vec<u8>, String>;
}

/// How a migration failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What happened and what to do.
    pub message: String,
    /// Cancelled on request.
    pub cancelled: bool,
    /// The switchover reached the destination and no answer came: the guest stays paused.
    pub outcome_unknown: bool,
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            cancelled: false,
            outcome_unknown: false,
        }
    }
}

/// The running pass: bytes of memory in frames, cut at [`protocol::MAX_MEMORY`].
struct Frames<'a, W: Write> {
    out: &'a mut W,
    ranges: Vec<Range>,
    data: Vec<u8>,
    sent: u64,
}

impl<'a, W: Write> Frames<'a, W> {
    fn new(out: &'a mut W) -> Self {
        Frames {
            out,
            ranges: Vec::new(),
            data: Vec::with_capacity(protocol::MAX_MEMORY as usize),
            sent: 0,
        }
    }

    fn room(&self) -> u64 {
        let table = 8 + (self.ranges.len() as u64 + 1) * 16;
        protocol::MAX_MEMORY.saturating_sub(table + self.data.len() as u64)
    }

    /// Sends the frame so far if another page or range would not fit in it.
    fn make_room(&mut self) -> Result<(), Failure> {
        if self.room() < PAGE || self.ranges.len() as u32 >= protocol::MAX_RANGES {
            self.flush()?;
        }
        Ok(())
    }

    /// Adds `len` bytes of guest memory at `addr`, read now.
    fn add(&mut self, mem: &GuestRam, mut addr: u64, mut len: u64) -> Result<(), Failure> {
        while len > 0 {
            self.make_room()?;
            let n = len.min(self.room());
            let at = self.data.len();
            self.data.resize(at + n as usize, 0);
            mem.read_slice(&mut self.data[at..], GuestAddress(addr))
                .map_err(|e| Failure::new(format!("reading guest memory at {addr:#x}: {e}")))?;
            self.push(addr, n);
            addr += n;
            len -= n;
        }
        Ok(())
    }

    /// Records a range whose bytes were just appended to `data`, merging with the last one.
    fn push(&mut self, addr: u64, len: u64) {
        match self.ranges.last_mut() {
            Some(last) if last.addr + last.len == addr => last.len += len,
            _ => self.ranges.push(Range { addr, len }),
        }
    }

    fn flush(&mut self) -> Result<(), Failure> {
        if self.ranges.is_empty() {
            return Ok(());
        }
        let table = protocol::encode_table(&self.ranges);
        let len = (table.len() + self.data.len()) as u64;
        protocol::write_header(self.out, Kind::Memory, len)
            .and_then(|()| self.out.write_all(&table))
            .and_then(|()| self.out.write_all(&self.data))
            .map_err(|e| Failure::new(format!("sending memory: {e}")))?;
        self.sent += self.data.len() as u64;
        self.ranges.clear();
        self.data.clear();
        Ok(())
    }
}

/// Pass 0: every page of guest memory that holds anything.
fn send_all<W: Write>(
    mem: &GuestRam,
    frames: &mut Frames<'_, W>,
    cancel: &AtomicBool,
) -> Result<(), Failure> {
    const CHUNK: u64 = 1 << 20;
    let mut chunk = vec![0u8; CHUNK as usize];
    let zero = [0u8; PAGE as usize];
    for region in mem.iter() {
        let (start, len) = (region.start_addr().0, region.len());
        let mut done = 0;
        while done < len {
            if cancel.load(Ordering::SeqCst) {
                return Err(cancelled());
            }
            let n = (len - done).min(CHUNK) as usize;
            mem.read_slice(&mut chunk[..n], GuestAddress(start + done))
                .map_err(|e| Failure::new(format!("reading guest memory: {e}")))?;
            for (i, page) in chunk[..n].chunks(PAGE as usize).enumerate() {
                if page != &zero[..page.len()] {
                    let addr = start + done + i as u64 * PAGE;
                    // Copied from the chunk just read rather than read again.
                    frames.make_room()?;
                    frames.data.extend_from_slice(page);
                    frames.push(addr, page.len() as u64);
                }
            }
            done += n as u64;
        }
    }
    frames.flush()
}

fn cancelled() -> Failure {
    Failure {
        message: "Migration cancelled: the guest keeps running here".into(),
        cancelled: true,
        outcome_unknown: false,
    }
}

/// SHA-256 of all guest memory, region by region.
pub fn memory_sha256(mem: &GuestRam) -> Result<String, String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let mut done = 0;
        while done < region.len() {
            let n = (region.len() - done).min(buf.len() as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(region.start_addr().0 + done))
                .map_err(|e| e.to_string())?;
            h.update(&buf[..n]);
            done += n as u64;
        }
    }
    Ok(crate::hex::hex(&h.finalize()))
}

/// The destination's answer: `ok` with its payload, or its refusal as a failure.
fn answer<R: Read>(stream: &mut R, after: &str) -> Result<Vec<u8>, ProtocolError> {
    let h = protocol::read_header(stream)?;
    let payload = protocol::read_payload(stream, h.len)?;
    match h.kind {
        Kind::Ok => Ok(payload),
        Kind::Error => {
            let r: Refusal = protocol::parse_json(Kind::Error, &payload)?;
            Err(ProtocolError::Refused(format!(
                "{after} ({}): {}",
                r.code, r.message
            )))
        }
        got => Err(ProtocolError::Unexpected {
            got,
            expected: "ok or error",
        }),
    }
}

/// Why the stream broke: the destination's own reason if it sent one before closing, else the
/// local error.
fn broken<S: Read>(stream: &mut S, e: Failure) -> Failure {
    match answer(stream, "the migration") {
        Err(e @ ProtocolError::Refused(_)) => Failure::new(e.to_string()),
        _ => e,
    }
}

/// Sends the guest of `src` over `stream` (see the module documentation), updating `status` as
/// it goes; `cancel` stops the pre-copy. The guest runs here again after any failure except an
/// unknown outcome.
pub fn send<S: Read + Write>(
    src: &impl Source,
    stream: &mut S,
    limits: Limits,
    verify_memory: bool,
    status: &Mutex<MigrationStatus>,
    cancel: &AtomicBool,
) -> Result<MigrationResult, Failure> {
    let started = Instant::now();
    update(status, |s| {
        *s = MigrationStatus {
            phase: MigrationPhase::Precopy,
            memory_bytes: src.memory_bytes(),
            ..Default::default()
        }
    });
    let start = Start {
        // The jail is this run's, not the guest's: the destination's agent gives its own.
        config: VmConfig {
            jail: None,
            ..src.config().clone()
        },
        memory_bytes: src.memory_bytes(),
    };
    protocol::write_json(stream, Kind::Start, &start)
        .map_err(|e| Failure::new(format!("sending the start: {e}")))?;
    answer(stream, "the guest").map_err(|e| Failure::new(e.to_string()))?;

    let mem = src.memory();
    let log = DirtyLog::start(src.vm(), mem)
        .map_err(|e| Failure::new(format!("turning dirty page logging on: {e}")))?;
    let precopy = precopy(mem, &log, stream, &limits, started, status, cancel);
    let (passes, sent) = precopy.inspect_err(|f| {
        // Between frames: the destination is told, and gives up too.
        if f.cancelled {
            let _ = protocol::write_frame(stream, Kind::Abandon, b"cancelled");
        }
    })?;
    switchover(
        src,
        &log,
        stream,
        verify_memory,
        status,
        (started, passes, sent),
    )
}

fn update(status: &Mutex<MigrationStatus>, f: impl FnOnce(&mut MigrationStatus)) {
    f(&mut status.lock().unwrap_or_else(|e| e.into_inner()));
}

/// The passes while the guest runs, until [`decide`] says switch over; the passes made and
/// the bytes sent.
fn precopy<S: Read + Write>(
    mem: &GuestRam,
    log: &DirtyLog<'_>,
    stream: &mut S,
    limits: &Limits,
    started: Instant,
    status: &Mutex<MigrationStatus>,
    cancel: &AtomicBool,
) -> Result<(u32, u64), Failure> {
    let mut sent = 0u64;
    let mut sending = Duration::ZERO;
    // The dirty passes alone: pass 0 mostly scans for zero pages, which says little about how
    // fast the last pass (dirty pages only) will go.
    let (mut dirty_sent, mut dirty_sending) = (0u64, Duration::ZERO);
    let mut passes = 0u32;
    // When the dirty log was last read (logging began just before pass 0), and how fast the
    // guest dirtied memory between that read and the one before it.
    let mut last_read = Instant::now();
    let mut dirty_rate = 0u64;
    // Pass 0, then the dirty passes.
    loop {
        let pass_started = Instant::now();
        let mut frames = Frames::new(stream);
        if passes == 0 {
            send_all(mem, &mut frames, cancel)?;
        } else {
            let dirty = log
                .take()
                .map_err(|e| Failure::new(format!("reading the dirty log: {e}")))?;
            let read = Instant::now();
            let dirtied = dirty.iter().map(|r| r.bytes()).sum();
            dirty_rate = per_second(dirtied, read - last_read);
            last_read = read;
            for region in &dirty {
                for (addr, len) in region.runs() {
                    if cancel.load(Ordering::SeqCst) {
                        return Err(cancelled());
                    }
                    frames.add(mem, addr, len)?;
                }
            }
            frames.flush()?;
        }
        let pass_sent = frames.sent;
        drop(frames);
        let took = pass_started.elapsed();
        sent += pass_sent;
        sending += took;
        if passes > 0 {
            dirty_sent += pass_sent;
            dirty_sending += took;
        }
        passes += 1;
        let (bytes, time) = if dirty_sent >= 1 << 20 {
            (dirty_sent, dirty_sending)
        } else {
            (sent, sending)
        };
        let bandwidth = per_second(bytes, time);
        // What the guest dirtied while this pass ran: a peek costs a KVM call and clears the
        // log, so it is taken as the next pass's input instead; until then it is taken to be
        // as much as this pass sent (what the guest dirtied during the pass before), which
        // errs on the safe side while the passes shrink.
        let left = if passes == 1 { sent } else { pass_sent };
        let decision = decide(passes, left, bandwidth, started.elapsed(), limits);
        update(status, |s| {
            s.pass = passes;
            s.bytes_sent = sent;
            s.bytes_left = left;
            s.dirty_rate_bytes_per_sec = dirty_rate;
            s.bandwidth_bytes_per_sec = bandwidth;
            s.expected_downtime_ms = expected_downtime(left, bandwidth)
                .as_millis()
                .min(u64::MAX as u128) as u64;
        });
        match decision {
            Decision::Continue => continue,
            Decision::GiveUp(why) => {
                let _ = protocol::write_frame(stream, Kind::Abandon, why.as_bytes());
                return Err(Failure::new(format!(
                    "Migration gave up, the guest keeps running here: {why}"
                )));
            }
            Decision::Switchover if passes == 1 => continue, // at least one dirty pass
            Decision::Switchover => break,
        }
    }
    if cancel.load(Ordering::SeqCst) {
        return Err(cancelled());
    }
    Ok((passes, sent))
}

/// Pause, the last pass, the state, the destination's answer (see the module documentation).
fn switchover<S: Read + Write>(
    src: &impl Source,
    log: &DirtyLog<'_>,
    stream: &mut S,
    verify_memory: bool,
    status: &Mutex<MigrationStatus>,
    (started, passes, sent): (Instant, u32, u64),
) -> Result<MigrationResult, Failure> {
    let mem = src.memory();
    update(status, |s| s.phase = MigrationPhase::Switchover);
    let paused = Instant::now();
    src.pause()
        .map_err(|e| Failure::new(format!("pausing the guest: {e}")))?;
    let resume_on = |e: Failure| {
        src.resume();
        e
    };
    let mut frames = Frames::new(stream);
    let last = (|| {
        for _ in 0..2 {
            // Twice: reading the state could make KVM write guest memory (kvmclock).
            let dirty = log
                .take()
                .map_err(|e| Failure::new(format!("reading the dirty log: {e}")))?;
            for region in &dirty {
                for (addr, len) in region.runs() {
                    frames.add(mem, addr, len)?;
                }
            }
        }
        frames.flush()
    })();
    let last_pass_bytes = frames.sent;
    drop(frames);
    last.map_err(resume_on)?;
    let last_pass_ms = paused.elapsed();
    let state = src
        .state()
        .map_err(|e| resume_on(Failure::new(format!("reading the VM state: {e}"))))?;
    let memory_sha256 = if verify_memory {
        Some(
            memory_sha256(mem)
                .map_err(|e| resume_on(Failure::new(format!("hashing guest memory: {e}"))))?,
        )
    } else {
        None
    };
    let state_done = paused.elapsed();
    protocol::write_frame(stream, Kind::State, &state)
        .and_then(|()| protocol::write_json(stream, Kind::Complete, &Complete { memory_sha256 }))
        .map_err(|e| {
            resume_on(broken(
                stream,
                Failure::new(format!("sending the device state: {e}")),
            ))
        })?;
    // From here the destination may run the guest.
    let resumed = match answer(stream, "the switchover") {
        Ok(payload) => protocol::parse_json::<Resumed>(Kind::Ok, &payload).unwrap_or_default(),
        Err(e @ ProtocolError::Refused(_)) => {
            src.resume();
            return Err(Failure::new(format!("{e}; the guest keeps running here")));
        }
        Err(e) => {
            return Err(Failure {
                message: format!(
                    "No answer to the switchover ({e}): the guest may be running on the \
                     destination. It stays paused here; check the destination before resuming \
                     or stopping it here"
                ),
                cancelled: false,
                outcome_unknown: true,
            })
        }
    };
    let downtime = paused.elapsed();
    let ms = |d: Duration| d.as_millis() as u64;
    let transfer = downtime
        .saturating_sub(state_done)
        .saturating_sub(Duration::from_millis(resumed.restore_ms));
    Ok(MigrationResult {
        passes: passes + 1,
        total_ms: ms(started.elapsed()),
        downtime_ms: ms(downtime),
        last_pass_ms: ms(last_pass_ms),
        state_ms: ms(state_done.saturating_sub(last_pass_ms)),
        transfer_ms: ms(transfer),
        resume_ms: resumed.restore_ms,
        bytes_sent: sent + last_pass_bytes,
        last_pass_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        downtime: Duration::from_millis(100),
        max_passes: 5,
        timeout: Duration::from_secs(60),
    };
    const MIB: u64 = 1 << 20;

    #[test]
    fn switches_over_once_the_rest_fits_in_the_downtime_limit() {
        // 100 MiB/s: 10 MiB takes 100 ms, 11 MiB more.
        assert_eq!(
            decide(2, 10 * MIB, 100 * MIB, Duration::ZERO, &LIMITS),
            Decision::Switchover
        );
        assert_eq!(
            decide(2, 11 * MIB, 100 * MIB, Duration::ZERO, &LIMITS),
            Decision::Continue
        );
        assert_eq!(
            decide(2, 0, 0, Duration::ZERO, &LIMITS),
            Decision::Switchover
        );
    }

    #[test]
    fn gives_up_after_the_pass_limit_or_the_timeout_saying_what_to_change() {
        let Decision::GiveUp(why) = decide(5, 64 * MIB, 100 * MIB, Duration::ZERO, &LIMITS) else {
            panic!("should give up")
        };
        assert!(why.contains("did not converge in 5 passes"), "{why}");
        assert!(why.contains("64 MiB still dirty"), "{why}");
        assert!(
            why.contains("expected downtime of 640 ms above the limit of 100 ms"),
            "{why}"
        );
        let Decision::GiveUp(why) =
            decide(2, 64 * MIB, 100 * MIB, Duration::from_secs(60), &LIMITS)
        else {
            panic!("should give up")
        };
        assert!(why.contains("in 60 s"), "{why}");
        // No bandwidth measured yet: never converged, never divides by zero.
        assert_eq!(
            decide(1, MIB, 0, Duration::ZERO, &LIMITS),
            Decision::Continue
        );
    }

    #[test]
    fn rates_are_bytes_over_time_and_never_divide_by_zero() {
        assert_eq!(per_second(64 * MIB, Duration::from_millis(500)), 128 * MIB);
        assert_eq!(per_second(MIB, Duration::ZERO), MIB * 1_000_000);
        assert_eq!(per_second(0, Duration::from_secs(1)), 0);
    }

    #[test]
    fn expected_downtime_is_bytes_over_bandwidth() {
        assert_eq!(expected_downtime(MIB, 1000 * MIB), Duration::from_millis(1));
        assert_eq!(expected_downtime(1, 0), Duration::MAX);
        assert_eq!(expected_downtime(0, 0), Duration::ZERO);
    }
}
