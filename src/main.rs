//! The `turnkey` command: serve, check a config, mint a credential, probe
//! a deployment.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use turnkey::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "turnkey",
    version,
    about = "STUN/TURN relay, WebRTC signaling and a demo video-chat page in one binary"
)]
struct Cli {
    /// Configuration file (TOML); without it, the embedded defaults.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and print the effective config, secrets masked.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Mint a TURN REST credential from the configured secret.
    Credentials {
        #[arg(long)]
        user: String,
        /// Lifetime in seconds (default: auth.rest_ttl_secs).
        #[arg(long)]
        ttl: Option<u64>,
        /// The usage label the credential carries (1-64 of A-Z a-z 0-9 _ . -).
        #[arg(long)]
        label: Option<String>,
    },
    /// Test a deployment from here: STUN, TURN over UDP, TCP and TLS, and a
    /// round trip through the relay, with what to fix when one fails.
    Probe {
        /// turnkey's base URL, e.g. https://turn.example.com
        #[arg(value_name = "URL")]
        url: String,
        /// Sent to /api/ice-servers as `Authorization: Bearer TOKEN`.
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Trust the CAs in this PEM file instead of the system's.
        #[arg(long, value_name = "PEM")]
        ca_file: Option<PathBuf>,
    },
}

fn load(file: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(file, std::env::vars()).map_err(|e| {
        eprintln!("turnkey: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => match load(Some(&file)) {
            Ok(cfg) => {
                print!("{}", cfg.to_masked_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Some(Command::Credentials { user, ttl, label }) => {
            if label
                .as_deref()
                .is_some_and(|l| !turnkey::turn::auth::valid_label(l))
            {
                eprintln!("turnkey: --label must be 1-64 of A-Z a-z 0-9 _ . -");
                return ExitCode::from(2);
            }
            let cfg = match load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let Some(secret) = cfg.auth.secrets.first() else {
                eprintln!("turnkey: config key `auth.secrets`: no secret configured (a server without one generates a random secret that only it knows)");
                return ExitCode::from(2);
            };
            let ttl = ttl.unwrap_or(cfg.auth.rest_ttl_secs);
            let cred = turnkey::turn::auth::mint_labelled(
                secret.expose(),
                &user,
                label.as_deref(),
                turnkey::ice::unix_now(),
                ttl,
            );
            match serde_json::to_string_pretty(&cred) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("turnkey: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Some(Command::Probe {
            url,
            token,
            json,
            ca_file,
        }) => probe(
            turnkey::probe::Options {
                url,
                token,
                ca_file,
            },
            json,
        ),
        None => {
            let cfg = match load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_tracing(&cfg);
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if cfg.http.threads > 0 {
                rt.worker_threads(cfg.http.threads);
            }
            let rt = match rt.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("turnkey: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(turnkey::app::serve(cfg, cli.config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs the probe: the report on stdout, and on failure one line on
/// stderr saying what to fix (exit 1); exit 2 when it cannot start.
fn probe(opts: turnkey::probe::Options, json: bool) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("turnkey probe: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match rt.block_on(turnkey::probe::run(&opts, turnkey::ice::unix_now())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("turnkey probe: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("turnkey probe: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", report.table());
    }
    match &report.fix {
        None if report.ok => ExitCode::SUCCESS,
        fix => {
            eprintln!("FAIL: {}", fix.as_deref().unwrap_or("nothing was tested"));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
