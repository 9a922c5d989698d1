//! A request path as the agent parses it; every route it yields must print back to a path that
//! parses to the same route.
#![no_main]

use hvnode_api::routes::{ManagerRoute, Route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(route) = Route::parse(path) {
        assert_eq!(Route::parse(&route.path()), Some(route.clone()), "{path:?}");
        assert!(!route.methods().is_empty());
    }
    if let Some(route) = ManagerRoute::parse(path) {
        assert_eq!(ManagerRoute::parse(&route.path()), Some(route));
    }
    let _ = hvnode_api::routes::query_param(path, "since");
});
