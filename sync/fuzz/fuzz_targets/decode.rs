//! Feeds arbitrary bytes to the sync message decoder: it must return a
//! message or an error, never panic, and a decoded message must re-encode to
//! something that decodes to the same message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_sync::protocol::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode(data) {
        let again = decode(&encode(&msg)).expect("a decoded message re-encodes");
        assert_eq!(again, msg);
    }
});
