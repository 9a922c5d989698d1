//! A line on a VMM's control socket and a line of its answer, as each side decodes them.
#![no_main]

use hvnode_api::vmm::{VmConfig, VmmRequest, VmmResponse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<VmmRequest>(data) {
        let again: VmmRequest = serde_json::from_slice(&serde_json::to_vec(&req).unwrap()).unwrap();
        assert_eq!(again, req);
    }
    let _ = serde_json::from_slice::<VmmResponse>(data);
    let _ = serde_json::from_slice::<VmConfig>(data);
});
