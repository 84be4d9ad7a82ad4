//! subnet.env, which weft-cni and other plugins read on every ADD: parsing
//! never panics, and what is accepted renders to text that reads back the
//! same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_config::SubnetEnv;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(env) = SubnetEnv::parse(text) {
        let rendered = env.render();
        let again = SubnetEnv::parse(&rendered)
            .unwrap_or_else(|e| panic!("its own rendering {rendered:?} does not parse: {e}"));
        assert_eq!(again.render(), rendered);
        let _ = env.subnets();
    }
});
