//! For tests across the workspace that need the real dataset: where it is, and what to do when
//! it is missing (skip loudly on a developer's machine, fail in CI).

use std::io::Write;
use std::path::PathBuf;

use crate::dataset::{Split, find_file};

/// Set (to anything but `0`) to make a missing dataset fail the tests that need it; CI sets it.
pub const REQUIRE_DATA_VAR: &str = "MNIST_REQUIRE_DATA";

/// Overrides where tests look for the dataset.
pub const DATA_DIR_VAR: &str = "MNIST_DATA_DIR";

/// Where the tests look for the real dataset: `$MNIST_DATA_DIR`, else the workspace's `data/mnist`.
pub fn real_data_dir() -> PathBuf {
    std::env::var_os(DATA_DIR_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist"))
}

/// The real dataset's directory, or `None` after a loud skip notice when it is not there.
///
/// # Panics
/// When the dataset is missing and `MNIST_REQUIRE_DATA` is set: then a skip would hide a gap.
pub fn real_data_or_skip(test_name: &str) -> Option<PathBuf> {
    let dir = real_data_dir();
    let present = [Split::Train, Split::Test].into_iter().all(|split| {
        find_file(&dir, split, "images", "idx3").is_ok()
            && find_file(&dir, split, "labels", "idx1").is_ok()
    });
    if present {
        return Some(dir);
    }
    let required = std::env::var(REQUIRE_DATA_VAR).is_ok_and(|v| v != "0");
    assert!(
        !required,
        "{test_name}: the real dataset is missing from {} and {REQUIRE_DATA_VAR} is set; \
         run `cargo xtask fetch-data`",
        dir.display()
    );
    // Straight to the process's stderr: the test harness captures `eprintln!`, and a skip
    // should be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {test_name}: no dataset in {} (run `cargo xtask fetch-data`) ***\n",
        dir.display()
    );
    None
}
