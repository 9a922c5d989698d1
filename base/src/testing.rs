//! For tests that need something of the machine (root, /dev/kvm, a binary, the ISO): where it is
//! missing they say so and return on a developer's machine, but under `CI=true` they fail, so
//! that a CI run never passes a test that did not run its subject.

/// Called by a test that cannot run its subject because of `why`: panics under `CI=true`,
/// otherwise prints why it is skipped. The caller returns after it.
pub fn cannot_run(test: &str, why: &str) {
    if in_ci() {
        panic!("{test} cannot run under CI=true: {why}");
    }
    eprintln!("skipping {test}: {why}");
}

/// Whether this is a CI run (`CI=true`, as CI systems set it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
