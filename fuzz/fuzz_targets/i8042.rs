//! The guest's port I/O to the i8042 keyboard controller: any sequence of reads and writes on
//! its two ports (and the ports around them) must leave it answering, never panicking.
#![no_main]

use arbitrary::Arbitrary;
use hvnode_vmm::devices::legacy::i8042::I8042;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Access {
    Read { port: u8 },
    Write { port: u8, value: u8 },
}

#[derive(Debug, Default)]
struct NoIrq;

impl vm_superio::Trigger for NoIrq {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|accesses: Vec<Access>| {
    let mut kbc = I8042::new(NoIrq);
    for a in accesses {
        match a {
            // 0x60-0x64: the controller's ports and the ones between them.
            Access::Read { port } => {
                kbc.read(0x60 + u16::from(port % 5));
            }
            Access::Write { port, value } => {
                let _ = kbc.write(0x60 + u16::from(port % 5), value);
            }
        }
    }
});
