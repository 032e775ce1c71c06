//! The command line: arguments split on NUL bytes. Any input gives a config (which must pass
//! its own validation), help, version, or an error naming a flag on one line; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast::{parse_args, Command};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let args: Vec<&str> = if text.is_empty() { Vec::new() } else { text.split('\0').collect() };
    match parse_args(args) {
        Ok(Command::Run(config)) => {
            assert!(config.validate().is_ok());
            assert!(config.max_message_bytes <= roomcast::config::MAX_MESSAGE_BYTES_LIMIT);
            assert!(config.effective_outbox_bytes() >= config.max_message_bytes.saturating_mul(2));
        }
        Ok(Command::Help | Command::Version) => {}
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
