//! An event stream as a client parses it, cut into chunks anywhere: a hostile or broken agent
//! must not make the parser panic or grow without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|chunks: Vec<Vec<u8>>| {
    let mut parser = hvnode_api::sse::Parser::default();
    for chunk in &chunks {
        for event in parser.push(chunk) {
            let _ = serde_json::from_str::<hvnode_api::event::Event>(&event);
        }
    }
});
