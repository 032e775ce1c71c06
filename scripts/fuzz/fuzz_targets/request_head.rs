//! Everything roomcast does with the bytes of a request head it did not write: parse it, then
//! route it as a WebSocket upgrade (room name, headers, origin, key) and as a plain HTTP
//! request (resource and room name). None of it may panic, and what it accepts must hold up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast::relay::connection::route;
use roomcast::http::endpoints::resource;
use roomcast::http::parse_head;
use roomcast::relay::hub::is_valid_room_name;
use roomcast::http::origin::Origin;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((request, head_len))) = parse_head(data) else { return };
    assert!(head_len <= data.len());
    // httparse ends a head at an empty line, accepting bare LF as well as CRLF.
    assert!(data[..head_len].ends_with(b"\n"));
    let allowed = [Origin::parse("https://allowed.example").expect("a valid origin")];
    for origins in [&[][..], &allowed[..]] {
        if let Ok(upgrade) = route(&request, origins) {
            assert!(is_valid_room_name(&upgrade.room), "{:?}", upgrade.room);
            assert!(upgrade.response.starts_with(b"HTTP/1.1 101 "));
        }
    }
    let _ = resource(&request.path);
});
