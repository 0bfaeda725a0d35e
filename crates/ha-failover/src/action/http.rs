//! [`HttpAction`]: calls an HTTP endpoint and wants a 2xx answer.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use ha_core::ConfigError;
use reqwest::{Client, Method, Url};

use super::{ActionContext, ActionError, FailoverAction};
use crate::Error;

/// How much of an unexpected answer's body is kept for the error message.
const BODY_EXCERPT: usize = 512;

/// The default bound on each request (connect, headers and body).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP methods an [`HttpAction`] sends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum HttpMethod {
    /// `GET`.
    Get,
    /// `POST`.
    Post,
    /// `PUT`.
    Put,
}

impl HttpMethod {
    fn method(self) -> Method {
        match self {
            HttpMethod::Get => Method::GET,
            HttpMethod::Post => Method::POST,
            HttpMethod::Put => Method::PUT,
        }
    }
}

/// One request.
#[derive(Clone, Debug)]
struct Call {
    method: HttpMethod,
    url: Url,
    /// A JSON body.
    body: Option<String>,
}

/// Calls an HTTP endpoint for the failover, and optionally others for the rollback and the
/// verification; a 2xx answer (after redirects, which are followed) is success, anything else
/// — another status, no answer, the request timeout — a failure that names the status and
/// the start of the body.
///
/// Every request carries the context as headers: `x-ha-component`, `x-ha-node`,
/// `x-ha-fencing-token`, `x-ha-attempt` and `x-ha-step` (`failover`, `rollback`, `verify`), so
/// the endpoint can fence a deposed leader. One `reqwest::Client` is built with the action
/// (or handed in with [`client`](Self::client)) and reused. Plain `http://` only: the client
/// is built without TLS, and without proxies from the environment. Each request is bounded by
/// [`timeout`](Self::timeout) (default 10 s), inside the manager's own timeout.
///
/// Without a rollback request, `rollback` returns [`ActionError::Unsupported`]; without a
/// verify request, `verify` checks nothing.
///
/// ```
/// use ha_failover::{HttpAction, HttpMethod};
///
/// let action = HttpAction::new(HttpMethod::Post, "http://10.0.0.5:8008/failover")?
///     .json_body(r#"{"candidate": "pg-2"}"#)
///     .rollback_request(HttpMethod::Post, "http://10.0.0.5:8008/switchover")?
///     .verify_request(HttpMethod::Get, "http://10.0.0.6:8008/primary")?;
/// assert!(HttpAction::new(HttpMethod::Get, "not a url").is_err());
/// # Ok::<(), ha_failover::Error>(())
/// ```
#[derive(Clone)]
pub struct HttpAction {
    client: Client,
    failover: Call,
    rollback: Option<Call>,
    verify: Option<Call>,
    timeout: Duration,
}

fn config_error(field: &str, rule: String) -> Error {
    Error::Config {
        what: "http action",
        source: ConfigError::new(field, rule),
    }
}

fn parse(field: &str, url: &str) -> Result<Url, Error> {
    let parsed = Url::parse(url).map_err(|e| config_error(field, format!("is not a URL: {e}")))?;
    if parsed.scheme() != "http" {
        let rule = format!("must be an http:// URL (no TLS support), got {parsed}");
        return Err(config_error(field, rule));
    }
    Ok(parsed)
}

impl HttpAction {
    /// Sends `method` to `url` for the failover. Fails with [`Error::Config`] on field `url`
    /// if it does not parse or is not `http`.
    pub fn new(method: HttpMethod, url: &str) -> Result<Self, Error> {
        let client = ha_clients::http::builder()
            .build()
            .map_err(|e| config_error("url", format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            client,
            failover: Call {
                method,
                url: parse("url", url)?,
                body: None,
            },
            rollback: None,
            verify: None,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sends `body` as JSON (`content-type: application/json`) with the failover request.
    #[must_use]
    pub fn json_body(mut self, body: impl Into<String>) -> Self {
        self.failover.body = Some(body.into());
        self
    }

    /// Sends `method` to `url` for the rollback (field `rollback` in errors).
    pub fn rollback_request(mut self, method: HttpMethod, url: &str) -> Result<Self, Error> {
        self.rollback = Some(Call {
            method,
            url: parse("rollback", url)?,
            body: None,
        });
        Ok(self)
    }

    /// Sends `method` to `url` to verify the failover (field `verify` in errors).
    pub fn verify_request(mut self, method: HttpMethod, url: &str) -> Result<Self, Error> {
        self.verify = Some(Call {
            method,
            url: parse("verify", url)?,
            body: None,
        });
        Ok(self)
    }

    /// Uses `client` (e.g. one shared by many actions, or one with TLS) instead of the one
    /// built by [`new`](Self::new).
    #[must_use]
    pub fn client(mut self, client: Client) -> Self {
        self.client = client;
        self
    }

    /// Bounds each request (default 10 s).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn send(
        &self,
        call: &Call,
        step: &'static str,
        ctx: &ActionContext,
    ) -> Result<(), ActionError> {
        let what = || format!("{} {}", call.method.method(), call.url);
        let mut request = self
            .client
            .request(call.method.method(), call.url.clone())
            .timeout(self.timeout)
            .header("x-ha-component", ctx.component())
            .header("x-ha-node", ctx.node().as_str())
            .header("x-ha-fencing-token", ctx.token().to_string())
            .header("x-ha-attempt", ctx.attempt().to_string())
            .header("x-ha-step", step);
        if let Some(body) = &call.body {
            request = request
                .header("content-type", "application/json")
                .body(body.clone());
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| ActionError::with_source(format!("{} failed", what()), e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // Read only the start of the body: enough to say why, bounded whatever is sent.
        let mut excerpt = Vec::new();
        while excerpt.len() < BODY_EXCERPT {
            match response.chunk().await {
                Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        excerpt.truncate(BODY_EXCERPT);
        let body = String::from_utf8_lossy(&excerpt);
        let body = body.trim();
        let mut message = format!("{} answered {status}", what());
        if !body.is_empty() {
            message.push_str(": ");
            message.push_str(body);
        }
        Err(ActionError::failed(message))
    }
}

impl fmt::Debug for HttpAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpAction")
            .field("failover", &self.failover)
            .field("rollback", &self.rollback)
            .field("verify", &self.verify)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl FailoverAction for HttpAction {
    async fn failover(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        self.send(&self.failover, "failover", ctx).await
    }

    async fn rollback(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        match &self.rollback {
            Some(call) => self.send(call, "rollback", ctx).await,
            None => Err(ActionError::unsupported(format!(
                "no rollback request was configured for {} {}",
                self.failover.method.method(),
                self.failover.url
            ))),
        }
    }

    /// Only with a rollback request.
    fn can_roll_back(&self) -> bool {
        self.rollback.is_some()
    }

    async fn verify(&self, ctx: &ActionContext) -> Result<(), ActionError> {
        match &self.verify {
            Some(call) => self.send(call, "verify", ctx).await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use ha_core::{AlwaysLeader, FencingToken, LeadershipGate, NodeId};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A one-route HTTP/1.1 server: answers every request with `status` and `body`, and keeps
    /// the head of every request it got.
    async fn server(status: &'static str, body: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                // Read the head (and the small body, if any, that follows it at once).
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = socket.read(&mut buf[len..]).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    len += n;
                }
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..len]).into_owned());
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        (format!("http://{addr}"), seen)
    }

    fn ctx() -> ActionContext {
        let gate = Arc::new(AlwaysLeader::new(FencingToken(9)));
        ActionContext::new("api", NodeId::new("n1"), 3, gate.is_leader().unwrap(), gate)
    }

    #[tokio::test]
    async fn two_hundreds_succeed_and_carry_the_context() {
        let (base, seen) = server("204 No Content", "").await;
        let action = HttpAction::new(HttpMethod::Post, &format!("{base}/promote"))
            .unwrap()
            .json_body("{}");
        action.failover(&ctx()).await.unwrap();
        let head = seen.lock().unwrap()[0].to_lowercase();
        assert!(head.starts_with("post /promote http/1.1"), "{head}");
        for header in [
            "x-ha-component: api",
            "x-ha-node: n1",
            "x-ha-fencing-token: 9",
            "x-ha-attempt: 3",
            "x-ha-step: failover",
            "content-type: application/json",
        ] {
            assert!(head.contains(header), "{header} missing in {head}");
        }
        assert!(action.rollback(&ctx()).await.unwrap_err().is_unsupported());
        action.verify(&ctx()).await.unwrap();
    }

    #[tokio::test]
    async fn other_statuses_and_no_answer_fail_with_the_reason() {
        let (base, _) = server("503 Service Unavailable", "replica lagging").await;
        let action = HttpAction::new(HttpMethod::Get, &format!("{base}/x"))
            .unwrap()
            .rollback_request(HttpMethod::Put, &format!("{base}/back"))
            .unwrap();
        let err = action.failover(&ctx()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("GET {base}/x answered 503 Service Unavailable: replica lagging")
        );
        assert!(action.rollback(&ctx()).await.is_err());

        // Nobody listens on a port just released.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = HttpAction::new(HttpMethod::Post, &format!("http://{addr}/"))
            .unwrap()
            .failover(&ctx())
            .await
            .unwrap_err();
        assert!(
            err.chain()
                .starts_with(&format!("POST http://{addr}/ failed")),
            "{}",
            err.chain()
        );
    }

    #[test]
    fn urls_are_checked_when_built() {
        let err = HttpAction::new(HttpMethod::Get, "https://example.com/").unwrap_err();
        assert!(err.to_string().contains("no TLS"), "{err}");
        let err = HttpAction::new(HttpMethod::Get, "http://a/")
            .unwrap()
            .verify_request(HttpMethod::Get, "::")
            .unwrap_err();
        let Error::Config { source, .. } = err else {
            panic!("{err}")
        };
        assert_eq!(source.field, "verify");
    }
}
