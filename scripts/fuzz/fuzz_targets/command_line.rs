//! The command line: arguments split on NUL bytes. Any input gives a config (which must pass
//! its own validation), help, version, or an error naming a flag on one line; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast::config::parse_args_from;
use roomcast::Command;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let args: Vec<&str> = if text.is_empty() { Vec::new() } else { text.split('\0').collect() };
    // The token file is read at parse time; a path the fuzzer names (a FIFO, /dev/stdin)
    // could block, and reading files is not what this target explores.
    if args.iter().any(|arg| arg.contains("token-file") || arg.contains("secret-file")) {
        return;
    }
    // No environment: the process's own ROOMCAST_* variables must not leak into the input.
    match parse_args_from(args, |_| None) {
        Ok(Command::Run(config)) => {
            assert!(config.validate().is_ok());
            assert!(config.max_message_bytes <= roomcast::config::MAX_MESSAGE_BYTES_LIMIT);
            assert!(config.effective_outbox_bytes() >= config.max_message_bytes.saturating_mul(2));
        }
        Ok(Command::Help | Command::Version | Command::Token(_)) => {}
        Err(err) => {
            assert!(!err.flag.is_empty() || args_had_empty(&text));
            assert!(!err.to_string().contains('\n') || err.flag.contains('\n'));
        }
    }
});

/// An empty argument is reported with an empty flag name; that is the one exception.
fn args_had_empty(text: &str) -> bool {
    text.split('\0').any(str::is_empty)
}
