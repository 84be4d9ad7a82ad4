//! Leases as they come from etcd (key and JSON value, written by anyone
//! with write access, flannel nodes included) and as a node reads them from
//! the controller's watch stream: nothing panics, and what is read writes
//! back to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_lease::api::WatchEvent;
use weft_lease::{LeaseAttrs, SubnetKey};

fuzz_target!(|data: &[u8]| {
    // The first line is the key, the rest the value.
    let (key, value) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(k) = std::str::from_utf8(key).unwrap_or("").parse::<SubnetKey>() {
        let text = k.to_string();
        assert_eq!(text.parse::<SubnetKey>().ok(), Some(k), "{text}");
        assert_eq!(SubnetKey::from_cidrs(&k.to_cidrs()).ok(), Some(k));
    }
    if let Ok(attrs) = LeaseAttrs::from_json(value) {
        if let Ok(b) = attrs.backend() {
            let value = b.to_value();
            let again = weft_lease::BackendData::parse(b.backend_type().as_str(), value.as_ref());
            assert_eq!(again.as_ref().ok(), Some(&b), "{value:?}");
        }
        let json = attrs.to_json();
        let again = LeaseAttrs::from_json(json.as_bytes())
            .unwrap_or_else(|e| panic!("its own JSON {json} does not read: {e}"));
        assert_eq!(again, attrs);
    }
    if let Ok(event) = serde_json::from_slice::<WatchEvent>(value) {
        if let Some(lease) = &event.lease {
            let _ = weft_backends::peer::read(lease);
        }
    }
});
