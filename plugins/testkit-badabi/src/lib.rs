//! A library that declares a future plugin ABI (major 99): the gateway must refuse it.
use umeme_plugin_sdk::abi;

static DECLARATION: abi::Declaration = abi::Declaration {
    magic: abi::MAGIC,
    abi_major: 99,
    abi_minor: 0,
    struct_size: std::mem::size_of::<abi::Declaration>() as u32,
    kind: abi::KIND_SINK,
    _reserved: 0,
    name: c"from-the-future".as_ptr(),
    plugin_version: c"9.9.9".as_ptr(),
    sdk_version: c"99.0.0".as_ptr(),
    rustc_version: c"rustc 9.99".as_ptr(),
    sink: std::ptr::null(),
    source: std::ptr::null(),
};

/// # Safety
/// Side-effect free; returns a static.
#[unsafe(no_mangle)]
pub extern "C" fn umeme_plugin_declare() -> *const abi::Declaration {
    &DECLARATION
}
