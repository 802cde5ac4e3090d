//! The plugin declaration reader: the ELF check the loader runs on a `.so`'s bytes before any
//! `dlopen` (machine, class, type, the exported `umeme_plugin_declare`). Any file is accepted or
//! refused with a reason, never a panic; and a file it accepts really exports the symbol.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umeme_gateway::plugin::check_elf;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = check_elf(data) {
        assert!(!e.to_string().is_empty());
    } else {
        // Accepted: the declaration's name must be in the file somewhere.
        assert!(data
            .windows(b"umeme_plugin_declare".len())
            .any(|w| w == b"umeme_plugin_declare"));
    }
});
