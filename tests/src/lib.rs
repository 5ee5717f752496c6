//! Helpers for end-to-end tests: find (or build) the real `commons` binary,
//! run it, and check the workspace's dependency rules.

pub mod node;
pub mod purity;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Environment variable naming a prebuilt `commons` binary to test instead of building one.
pub const ENV_BIN: &str = "COMMONS_BIN";

/// Path of the `commons` binary under test: `$COMMONS_BIN`, or the workspace's
/// own build (built on first use, in the same profile as the tests).
pub fn commons_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os(ENV_BIN) {
            return PathBuf::from(path);
        }
        // With the test-only fault injection, as the workspace's test build
        // has it (this crate enables it), so nothing is built twice.
        let build = escargot::CargoBuild::new()
            .package("commons-node")
            .bin("commons")
            .features("fault");
        let build = if cfg!(debug_assertions) {
            build
        } else {
            build.release()
        };
        match build.run() {
            Ok(run) => run.path().to_owned(),
            Err(err) => panic!("cannot build the commons binary: {err}"),
        }
    })
    .clone()
}

/// A `commons` command with a private data and config directory, so tests never
/// touch the user's own settings.
pub fn commons(home: &std::path::Path) -> Command {
    let mut cmd = Command::new(commons_bin());
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_DATA_HOME", home.join("data"))
        .env_remove("COMMONS_CONFIG")
        .env_remove("COMMONS_DATA_DIR")
        .env_remove("COMMONS_KEY")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs `cmd` and returns its output, failing the test if it could not start.
pub fn output(cmd: &mut Command) -> Output {
    match cmd.output() {
        Ok(out) => out,
        Err(err) => panic!("cannot run {cmd:?}: {err}"),
    }
}

/// stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
