//! The configuration loader: `Config::from_toml` on arbitrary text (the corpus starts from
//! every file of examples/). It must never panic: a file is either a configuration or a list
//! of errors, each with a message; a valid one also becomes the server's setup.
#![no_main]

use libfuzzer_sys::fuzz_target;
use microscaler_backends::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(cfg) => {
            for s in &cfg.services {
                let _ = cfg.scaling_of(&s.name);
            }
            let _ = cfg.capabilities();
            let _ = microscaler_server::Setup::from_config(&cfg, "fuzz", false);
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error without a message");
            for e in &errors.0 {
                assert!(!e.message.is_empty(), "an empty message at {:?}", e.path);
            }
            let _ = errors.to_string();
        }
    }
});
