//! Root-only tests in a private network namespace.
