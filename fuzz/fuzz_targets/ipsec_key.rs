//! The node's IPsec key file and the PSK file: nothing panics; a key that
//! is accepted is the one its file names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_node::keystore;
use zeroize::Zeroizing;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(k) = keystore::parse_key(text) {
            assert!(k.epoch() >= 1);
            // (JSON may escape it: compare the parsed field.)
            let v: serde_json::Value = serde_json::from_str(text).expect("it parsed");
            assert_eq!(
                v["public_key"].as_str(),
                Some(keystore::public_b64(&k).as_str())
            );
        }
    }
    if let Ok(psk) = keystore::psk_from_bytes(Zeroizing::new(data.to_vec())) {
        assert!(!psk.is_empty() && data.starts_with(&psk));
        assert!(!psk.ends_with(b"\n"));
    }
});
