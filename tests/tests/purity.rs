//! The pure crates stay free of tokio, libp2p and candle (and quinn, mio).
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

#[test]
fn pure_crates_have_no_io_or_kernel_dependencies() {
    let metadata = commons_tests::purity::workspace_metadata().unwrap();
    let violations = commons_tests::purity::violations(&metadata).unwrap();
    assert_eq!(violations.len(), commons_tests::purity::PURE.len());
    for (krate, bad) in violations {
        assert!(
            bad.is_empty(),
            "{krate} depends on {bad:?}: the pure cores must stay free of I/O and kernels"
        );
    }
}
