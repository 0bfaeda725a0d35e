//! `ha_orchestrator::Error`: what can go wrong building, configuring or running a node.

use std::net::SocketAddr;
use std::path::PathBuf;

use ha_core::{BoxError, ConfigError};

/// What can go wrong building, configuring or running a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The node's composition breaks a rule; the error names the dotted path and the rule.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A config file could not be read or parsed, or a value in it broke a rule.
    #[error("{}: {message}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the dotted path (e.g. `failover.components[2].depends_on`).
        message: String,
    },
    /// A component could not be built from its config (e.g. a store or a check could not
    /// connect).
    #[error("{path}: {source}")]
    Setup {
        /// The dotted path of the part that failed, e.g. `election.store`.
        path: String,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// A component failed to start or stop.
    #[error(transparent)]
    Component(#[from] ha_core::Error),
    /// The HTTP API could not bind its address.
    #[error("cannot serve the HTTP API on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The node was already started, or was stopped and cannot start again.
    #[error("the node {0}")]
    Lifecycle(&'static str),
    /// What was asked is not implemented.
    #[error("{what} is not supported: {why}")]
    Unsupported {
        /// What.
        what: String,
        /// Why, or what to use instead.
        why: String,
    },
}

impl Error {
    /// Whether the same call may succeed later without a change of config or code.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Component(e) => e.is_retryable(),
            Error::Setup { .. } | Error::Bind { .. } => true,
            Error::Config(_)
            | Error::ConfigFile { .. }
            | Error::Lifecycle(_)
            | Error::Unsupported { .. } => false,
        }
    }

    /// Whether this is a configuration mistake (as opposed to a runtime failure): `ha-node`
    /// exits with a different code for each.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Error::Config(_) | Error::ConfigFile { .. } | Error::Unsupported { .. }
        )
    }
}
