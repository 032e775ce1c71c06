//! The `roomcast` binary: parse flags, start logging, install the signal handler, run.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::net::TcpListener;
use std::process::exit;
use std::sync::atomic::{AtomicUsize, Ordering};

use log::info;
use roomcast::{Command, Config, Error, Shutdown};
use simplelog::{
    ColorChoice, CombinedLogger, ConfigBuilder, SharedLogger, TermLogger, TerminalMode,
    ThreadLogMode, WriteLogger,
};

/// Exit status when a second signal cuts shutdown short (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: i32 = 130;

fn main() {
    let config = match roomcast::parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(config)) => *config,
        Ok(Command::Help) => {
            print!("{}", roomcast::config::help());
            return;
        }
        Ok(Command::Version) => {
            println!("roomcast {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Err(err) => {
            eprintln!("roomcast: {err}");
            exit(2);
        }
    };
    let mut config = config;
    if config.api_token.is_none() {
        config.api_token = std::env::var(roomcast::config::API_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty());
    }
    if let Err(err) = run(config) {
        eprintln!("roomcast: {err}");
        exit(err.exit_code());
    }
}

fn run(config: Config) -> Result<(), Error> {
    init_logging(&config)?;
    let listener = TcpListener::bind(config.listen).map_err(|source| Error::Io {
        what: "binding --listen",
        source,
    })?;

    let shutdown = Shutdown::new();
    let signals = AtomicUsize::new(0);
    let handle = shutdown.clone();
    ctrlc::set_handler(move || {
        if signals.fetch_add(1, Ordering::SeqCst) == 0 {
            info!("signal received: shutting down (send another to exit at once)");
            handle.trigger();
        } else {
            eprintln!("roomcast: second signal, exiting at once");
            exit(EXIT_INTERRUPTED);
        }
    })
    .map_err(|err| Error::Io {
        what: "installing the signal handler",
        source: std::io::Error::other(err),
    })?;

    roomcast::run(listener, config, &shutdown)?;
    Ok(())
}

/// Logs to stderr and, with `--log-file`, to that file too. Thread names (`worker-7`,
/// `broadcaster`) are on every line, and a connection's lines carry its id, so one client's
/// story can be followed with grep.
fn init_logging(config: &Config) -> Result<(), Error> {
    let log_config = ConfigBuilder::new()
        .set_thread_level(log::LevelFilter::Error)
        .set_thread_mode(ThreadLogMode::Names)
        .set_target_level(log::LevelFilter::Off)
        .build();
    // termcolor's `Auto` looks only at TERM, so colour escapes would land in piped logs.
    let color = if std::io::stderr().is_terminal() {
        ColorChoice::Auto
    } else {
        ColorChoice::Never
    };
    let mut loggers: Vec<Box<dyn SharedLogger>> = vec![TermLogger::new(
        config.log_level,
        log_config.clone(),
        TerminalMode::Stderr,
        color,
    )];
    if let Some(path) = &config.log_file {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| Error::Io {
                what: "opening --log-file",
                source,
            })?;
        loggers.push(WriteLogger::new(config.log_level, log_config, file));
    }
    CombinedLogger::init(loggers).map_err(|err| Error::Io {
        what: "starting the logger",
        source: std::io::Error::other(err),
    })
}
