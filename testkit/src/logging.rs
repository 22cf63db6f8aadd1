//! A test log writer: `RUST_LOG` selects, quiet by default.

/// The filter when `RUST_LOG` is not set.
pub const DEFAULT_TEST_LOG: &str = "warn,openraft=error";

/// Installs a log writer that goes through the test harness's capture, once per process;
/// later calls do nothing.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_TEST_LOG)),
        )
        .try_init();
}
