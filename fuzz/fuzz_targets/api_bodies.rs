//! What a client sends the agent and what an admin writes in files: JSON bodies and their
//! validation, `node.toml` and guest definitions in TOML. None may panic; whatever parses and
//! validates must survive a round trip unchanged.
#![no_main]

use hvnode_api::config::{NetworkConfig, NodeConfig};
use hvnode_api::guest::GuestSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => {
            if let Ok(spec) = serde_json::from_slice::<GuestSpec>(rest) {
                if spec.validate().is_ok() {
                    let again: GuestSpec =
                        serde_json::from_slice(&serde_json::to_vec(&spec).unwrap()).unwrap();
                    assert_eq!(again, spec);
                }
            }
        }
        1 => {
            if let Ok(net) = serde_json::from_slice::<NetworkConfig>(rest) {
                let _ = net.validate();
            }
        }
        2 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(config) = NodeConfig::from_toml(text) {
                    let again = NodeConfig::from_toml(&config.to_toml()).unwrap();
                    assert_eq!(again, config);
                }
            }
        }
        3 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(spec) = toml::from_str::<GuestSpec>(text) {
                    let _ = spec.validate();
                }
            }
        }
        _ => {
            let _ = serde_json::from_slice::<hvnode_api::registration::PairRequest>(rest);
            let _ = serde_json::from_slice::<hvnode_api::node::StorageInit>(rest);
            let _ = serde_json::from_slice::<hvnode_api::error::ApiError>(rest);
        }
    }
});
