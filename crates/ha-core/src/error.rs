//! `ha_core::Error`: failures of the shared machinery (config, components, leadership).

use crate::config::ConfigError;
use crate::id::NodeId;

/// A boxed error from another crate, carried as a source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What can go wrong in the shared machinery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A config broke a rule.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A component failed to start or stop.
    #[error("component `{component}` failed to {action}: {source}")]
    Component {
        /// The component's name.
        component: String,
        /// `start` or `stop`.
        action: &'static str,
        /// Why.
        #[source]
        source: BoxError,
        /// Whether trying again may help (e.g. a server was unreachable).
        retryable: bool,
    },
    /// A leader-only operation was refused because this node does not lead.
    #[error("{operation} refused: node `{node}` is not the leader")]
    NotLeader {
        /// This node.
        node: NodeId,
        /// What was refused.
        operation: String,
    },
}

impl Error {
    /// Whether the same call may succeed later without a change of config or code.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Config(_) => false,
            Error::Component { retryable, .. } => *retryable,
            // Leadership may come back.
            Error::NotLeader { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_are_not_retryable_and_keep_their_text() {
        let e: Error = ConfigError::new("ttl", "must be greater than zero").into();
        assert!(!e.is_retryable());
        assert_eq!(
            e.to_string(),
            "invalid config: `ttl` must be greater than zero"
        );
        let e = Error::NotLeader {
            node: NodeId::new("b"),
            operation: "promote replica r1".into(),
        };
        assert!(e.is_retryable());
        assert_eq!(
            e.to_string(),
            "promote replica r1 refused: node `b` is not the leader"
        );
    }
}
