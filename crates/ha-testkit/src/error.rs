//! The testkit's error type.

use std::path::PathBuf;

/// Why a test server or proxy could not be started, faulted or queried.
///
/// Every variant names what it was about (which binary, which port, which server) so that a
/// failing test says what to fix, e.g. "install postgresql", not just "No such file".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// A server binary is not installed.
    #[error("`{binary}` not found (looked in: {looked_in}); install it with `{install_hint}`")]
    MissingBinary {
        /// The binary that was looked for, e.g. `redis-server`.
        binary: String,
        /// Where it was looked for.
        looked_in: String,
        /// The command that installs it on Debian.
        install_hint: String,
    },
    /// Spawning or waiting on a child process failed at the OS level.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, e.g. "spawn redis-server on port 40123".
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A helper command (initdb, pg_basebackup, ...) ran but failed.
    #[error("`{command}` failed with {status}: {output}")]
    CommandFailed {
        /// The command line that failed.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The tail of what it printed (stdout and stderr).
        output: String,
    },
    /// A server did not become ready before its deadline.
    #[error("{server} on port {port} not ready after {waited:?}: {detail}; log tail:\n{log_tail}")]
    NotReady {
        /// Which server, e.g. "redis-server".
        server: String,
        /// The port it should listen on.
        port: u16,
        /// How long we waited.
        waited: std::time::Duration,
        /// The last probe error.
        detail: String,
        /// The last lines of the server's log, if it has one.
        log_tail: String,
    },
    /// A server process exited while we waited for it.
    #[error("{server} on port {port} exited early with {status}; log tail:\n{log_tail}")]
    Exited {
        /// Which server.
        server: String,
        /// The port it should have listened on.
        port: u16,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The last lines of its log.
        log_tail: String,
    },
    /// A query against a test server failed.
    #[error("{server} on port {port}: {detail}")]
    Query {
        /// Which server.
        server: String,
        /// Its port.
        port: u16,
        /// What went wrong.
        detail: String,
    },
    /// A signal could not be delivered.
    #[error("cannot send {signal} to {server} (pid {pid}): {source}")]
    Signal {
        /// Which server.
        server: String,
        /// The process (group) id.
        pid: i32,
        /// The signal's name.
        signal: &'static str,
        /// The OS error.
        #[source]
        source: nix::errno::Errno,
    },
    /// The Docker backend failed (feature `containers`).
    #[error("{server}: {detail}")]
    Container {
        /// Which server.
        server: String,
        /// What went wrong.
        detail: String,
    },
    /// A binary of this workspace is older than its sources: the test would run old code.
    #[error("{binary} is older than {source_file}; rebuild it with `{build_hint}`")]
    StaleBinary {
        /// The binary.
        binary: PathBuf,
        /// A source file changed after it was built.
        source_file: PathBuf,
        /// The command that builds it.
        build_hint: String,
    },
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl TestkitError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::File {
            path: path.into(),
            source,
        }
    }
}

/// The testkit's result type.
pub type Result<T, E = TestkitError> = std::result::Result<T, E>;
