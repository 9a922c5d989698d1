//! A snapshot's state file as the VMM reads it on restore: a snapshot directory is a file anyone
//! with access to the data partition could have changed. Raw input exercises the envelope and
//! its refusals; wrapped input (a body given a valid checksum here) reaches the state itself.
//! Whatever decodes must encode and decode back to the same state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let Ok(body) = std::str::from_utf8(rest) else {
            return;
        };
        let digest: String = Sha256::digest(body.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!(
            r#"{{"format":"hvnode-vm-state","version":1,"checksum":"sha256:{digest}","body":{body}}}"#
        )
        .into_bytes()
    };
    if let Ok(state) = hvnode_vmm::persist::decode(&file) {
        let again =
            hvnode_vmm::persist::decode(&hvnode_vmm::persist::encode(&state).unwrap()).unwrap();
        assert_eq!(again, state);
    }
});
