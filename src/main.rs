//! The `roomcast` binary: parse flags, start logging, install the signal handler, run; or, as
//! `roomcast token`, print one join token.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::net::TcpListener;
use std::process::exit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{info, warn};
use roomcast::config::TokenRequest;
use roomcast::v1::token;
use roomcast::{Command, Config, Error, Shutdown};
use simplelog::{
    ColorChoice, CombinedLogger, ConfigBuilder, SharedLogger, TermLogger, TerminalMode,
    ThreadLogMode, WriteLogger,
};

/// Exit status when a second signal cuts shutdown short (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: i32 = 130;

fn main() {
    let args = match utf8_args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("roomcast: {err}");
            exit(2);
        }
    };
    let config = match roomcast::parse_args(args.iter().cloned()) {
        Ok(Command::Run(config)) => *config,
        Ok(Command::Help) => {
            print!("{}", roomcast::config::help());
            return;
        }
        Ok(Command::Version) => {
            println!("roomcast {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Ok(Command::Token(request)) => {
            for flag in roomcast::config::secrets_on_command_line(&args) {
                eprintln!("roomcast: warning: {}", exposed_secret_warning(flag));
            }
            match mint_token(&request, SystemTime::now()) {
                Ok(token) => println!("{token}"),
                Err(err) => {
                    eprintln!("roomcast: {err}");
                    exit(1);
                }
            }
            return;
        }
        Err(err) => {
            eprintln!("roomcast: {err}");
            exit(2);
        }
    };
    if let Err(err) = run(config, &roomcast::config::secrets_on_command_line(&args)) {
        eprintln!("roomcast: {err}");
        exit(err.exit_code());
    }
}

/// The arguments after the program name. `std::env::args` panics on one that is not UTF-8;
/// this says which one and exits 2 like any other bad flag. It does not echo the argument,
/// which may be a secret.
fn utf8_args() -> Result<Vec<String>, String> {
    std::env::args_os()
        .skip(1)
        .enumerate()
        .map(|(i, arg)| {
            arg.into_string()
                .map_err(|_| format!("argument {} is not valid UTF-8", i + 1))
        })
        .collect()
}

/// `roomcast token`: the request's claims, `iat` now and `exp` `ttl` later (whole seconds, as
/// most libraries write them), signed. The token is verified before it is printed, with the
/// server's own check: a token that the server would refuse is a bug here, never output.
fn mint_token(request: &TokenRequest, now: SystemTime) -> Result<String, String> {
    let iat = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "the system clock is before 1970".to_string())?
        .as_secs();
    let mut claims = serde_json::json!({
        "sub": request.sub,
        "room": request.room,
        "iat": iat,
        "exp": iat + request.ttl.as_secs(),
    });
    if let Some(name) = &request.name {
        claims["name"] = name.as_str().into();
    }
    if let Some(perm) = request.perm {
        claims["perm"] = perm.as_str().into();
    }
    let minted = token::mint(request.secret.as_bytes(), &claims);
    // `*` opens every room, so any valid name checks it.
    let room = match request.room.as_str() {
        token::ANY_ROOM => "lobby",
        room => room,
    };
    token::verify(&minted, &[request.secret.as_bytes()], room, now)
        .map_err(|rejection| format!("the minted token does not verify ({rejection}): a bug"))?;
    Ok(minted)
}

/// The warning for a secret-bearing `flag` given on the command line.
fn exposed_secret_warning(flag: &str) -> String {
    let instead = match flag {
        "--api-token" => " or --api-token-file",
        "--token-secret" => " or --token-secret-file",
        _ => "",
    };
    format!(
        "{flag} is on the command line, where any local user can read it (ps): use {}{instead} instead",
        roomcast::config::env_var(flag)
    )
}

/// `exposed_secrets` are the secret-bearing flags given on the command line, warned about once
/// logging is up.
fn run(config: Config, exposed_secrets: &[&str]) -> Result<(), Error> {
    init_logging(&config)?;
    for &flag in exposed_secrets {
        warn!("{}", exposed_secret_warning(flag));
    }
    let names: Vec<String> = std::env::vars_os()
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .collect();
    for name in roomcast::config::unknown_variables(names.iter().map(String::as_str)) {
        warn!("{name} is set but no flag reads it (a typo?); see --help for the variables");
    }
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
