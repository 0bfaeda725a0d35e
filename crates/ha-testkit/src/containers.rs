//! The optional Docker backend (feature `containers`): Redis and PostgreSQL from official
//! images, for machines where the servers are not installed but a Docker engine runs.
//!
//! The default backend — local processes ([`crate::process`]) — is what CI uses: it needs no
//! engine, starts faster, and can pause single processes. Here faults are per container:
//! [`ContainerServer::pause`] freezes the container's cgroup (like SIGSTOP), [`stop`] and
//! [`start`] act like a crash and a restart. Docker maps a new host port on every start, so
//! read [`ContainerServer::addr`] again after a restart.
//!
//! [`stop`]: ContainerServer::stop
//! [`start`]: ContainerServer::start

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

use crate::error::{Result, TestkitError};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// A server running in a Docker container, removed on drop.
pub struct ContainerServer {
    kind: &'static str,
    internal_port: u16,
    container: ContainerAsync<GenericImage>,
}

impl std::fmt::Debug for ContainerServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerServer")
            .field("kind", &self.kind)
            .field("id", &self.container.id())
            .finish()
    }
}

impl ContainerServer {
    /// `redis:7` without persistence.
    pub async fn redis() -> Result<Self> {
        let request = GenericImage::new("redis", "7")
            .with_exposed_port(6379.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
            .with_cmd(["redis-server", "--save", "", "--appendonly", "no"])
            .with_startup_timeout(STARTUP_TIMEOUT);
        Self::run("redis", 6379, request.start().await).await
    }

    /// `postgres:15` with trust authentication for user `postgres`.
    pub async fn postgres() -> Result<Self> {
        let request = GenericImage::new("postgres", "15")
            .with_exposed_port(5432.tcp())
            // The image starts the server twice (init, then for real); wait for the second.
            .with_wait_for(WaitFor::message_on_stdout(
                "PostgreSQL init process complete",
            ))
            .with_wait_for(WaitFor::message_on_stderr(
                "database system is ready to accept connections",
            ))
            .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
            .with_startup_timeout(STARTUP_TIMEOUT);
        Self::run("postgres", 5432, request.start().await).await
    }

    async fn run(
        kind: &'static str,
        internal_port: u16,
        started: testcontainers::core::error::Result<ContainerAsync<GenericImage>>,
    ) -> Result<Self> {
        let container = started.map_err(|e| container_error(kind, "start", e))?;
        Ok(Self {
            kind,
            internal_port,
            container,
        })
    }

    /// The host address the server's port is mapped to (changes after a restart).
    pub async fn addr(&self) -> Result<SocketAddr> {
        let port = self
            .container
            .get_host_port_ipv4(self.internal_port.tcp())
            .await
            .map_err(|e| container_error(self.kind, "read the mapped port", e))?;
        Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    /// A connection URL (`redis://…` or `postgres://postgres@…/postgres`).
    pub async fn url(&self) -> Result<String> {
        let addr = self.addr().await?;
        Ok(match self.kind {
            "postgres" => format!("postgres://postgres@{addr}/postgres"),
            _ => format!("redis://{addr}"),
        })
    }

    /// Freezes the container (cgroup freezer): sockets stay open, nothing answers.
    pub async fn pause(&self) -> Result<()> {
        self.container
            .pause()
            .await
            .map_err(|e| container_error(self.kind, "pause", e))
    }

    /// Thaws a paused container.
    pub async fn resume(&self) -> Result<()> {
        self.container
            .unpause()
            .await
            .map_err(|e| container_error(self.kind, "unpause", e))
    }

    /// Stops the container without a grace period (SIGKILL): a crash.
    pub async fn stop(&self) -> Result<()> {
        self.container
            .stop_with_timeout(Some(0))
            .await
            .map_err(|e| container_error(self.kind, "stop", e))
    }

    /// Starts a stopped container again (a restart; data outside volumes is kept).
    pub async fn start(&self) -> Result<()> {
        self.container
            .start()
            .await
            .map_err(|e| container_error(self.kind, "start", e))
    }
}

fn container_error(kind: &str, action: &str, error: impl std::fmt::Display) -> TestkitError {
    TestkitError::Container {
        server: kind.to_owned(),
        detail: format!(
            "cannot {action} the {kind} container: {error} (the `containers` backend needs a running Docker engine; the default backend uses local processes)"
        ),
    }
}
