//! `ha-node --config ha.toml`: runs one HA node until SIGTERM or Ctrl-C.
//!
//! Exit codes: 0 stopped cleanly; 1 failed while running; 2 invalid config (the message names
//! the file, the dotted path and the rule); 3 a part could not be set up (a store or check
//! could not connect, the API address is taken).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ha_orchestrator::config::LogFormat;
use ha_orchestrator::{Error, HaConfig, Redactor, Secret};

/// Runs one HA node from a config file.
#[derive(Parser, Debug)]
#[command(name = "ha-node", version, about)]
struct Args {
    /// The node's TOML config (environment overrides: HA_NODE_ID, HA_ADMIN_TOKEN,
    /// HA_STORE_URL, HA_HTTP_LISTEN, HA_SECTION__KEY).
    #[arg(long, short)]
    config: PathBuf,
    /// Log format: human or json (overrides the config's log_format).
    #[arg(long)]
    log_format: Option<String>,
    /// Validate the config and exit.
    #[arg(long)]
    check: bool,
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_SETUP: u8 = 3;

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match HaConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ha-node: {}", Redactor::default().redact(&e.to_string()));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let json = match args.log_format.as_deref() {
        Some("json") => true,
        Some("human") => false,
        Some(other) => {
            eprintln!("ha-node: --log-format: must be human or json, not {other:?}");
            return ExitCode::from(EXIT_CONFIG);
        }
        None => config.log_format == LogFormat::Json,
    };
    init_logs(json);
    if args.check {
        eprintln!("ha-node: {} is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ha-node: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let secrets: Vec<Secret> = config
        .http
        .admin_token
        .iter()
        .map(|t| Secret::new(t.clone()))
        .collect();
    let redactor = Redactor::new(secrets);
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = redactor.redact(&error_chain(&e));
            tracing::error!(error = %message, "ha-node failed");
            eprintln!("ha-node: {message}");
            ExitCode::from(if e.is_config() {
                EXIT_CONFIG
            } else if matches!(e, Error::Setup { .. } | Error::Bind { .. }) {
                EXIT_SETUP
            } else {
                EXIT_RUNTIME
            })
        }
    }
}

async fn run(config: HaConfig) -> Result<(), Error> {
    // The binary, never the library, installs the recorder; the node serves its text.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder was already installed; /metrics serves this one's view");
    }
    let node = config
        .into_builder()
        .await?
        .metrics(move || handle.render())
        .build()?;
    node.run_until_signal().await
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().with_ansi(false).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}
