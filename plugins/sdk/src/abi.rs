//! The C ABI between umeme-gateway and its plugins. Only `#[repr(C)]` data and `extern "C"`
//! functions cross it, so a plugin built by another rustc version loads.
//!
//! Rules that keep it stable:
//! - A library exports one symbol, [`DECLARE_SYMBOL`], returning a `'static` [`Declaration`].
//! - The first fields of the declaration (`magic`, `abi_major`, `abi_minor`, `struct_size`) are
//!   frozen. The host refuses another `abi_major`; any `abi_minor` is accepted.
//! - Every table carries its `struct_size`; fields are only ever appended, and a reader checks
//!   the size before touching a field that a newer minor added.
//! - Data is borrowed for the duration of a call ([`Str`]); anything a callee returns is copied
//!   out through the caller's [`Writer`]. Nothing allocated on one side is freed on the other.
//! - Every entry point catches panics and returns [`PANICKED`]; an instance that panicked is
//!   poisoned and only `destroy` may be called on it.
//! - JSON (UTF-8) is the payload format: config, batches, payments, health.

use std::ffi::{c_char, c_void};

/// `u64::from_le_bytes(*b"UMEMEPLG")`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"UMEMEPLG");
pub const ABI_MAJOR: u16 = 1;
/// 1: `HostApi::record_unapplied`. 2: `HostApi::validate_payment`.
pub const ABI_MINOR: u16 = 2;
/// The one symbol a plugin exports: `extern "C" fn() -> *const Declaration`.
pub const DECLARE_SYMBOL: &str = "umeme_plugin_declare";

pub type Status = u32;
pub const OK: Status = 0;
/// Try again later (a `retry_after_ms` may be set).
pub const RETRYABLE: Status = 1;
/// Will never succeed: the whole batch (sink) or this payment (source) is refused.
pub const PERMANENT: Status = 2;
/// The configuration cannot work (returned by `create`, or by `deliver` for bad credentials).
pub const BAD_CONFIG: Status = 3;
/// The call panicked; the instance is poisoned.
pub const PANICKED: Status = 4;
/// Some events of the batch are refused for good: the writer got `[{"seq", "reason"}]`; the
/// rest of the batch is delivered. For host callbacks: the request was refused (e.g. unknown meter).
pub const REJECTED: Status = 5;
/// The host is overloaded; try again shortly.
pub const BUSY: Status = 6;
/// The host does not offer this service to this kind of plugin.
pub const UNSUPPORTED: Status = 7;

pub const KIND_SINK: u32 = 1;
pub const KIND_SOURCE: u32 = 2;

pub const LEVEL_ERROR: u32 = 1;
pub const LEVEL_WARN: u32 = 2;
pub const LEVEL_INFO: u32 = 3;
pub const LEVEL_DEBUG: u32 = 4;
pub const LEVEL_TRACE: u32 = 5;

/// Borrowed UTF-8 bytes, valid for the call only.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Str {
    pub ptr: *const u8,
    pub len: usize,
}

impl Str {
    pub fn new(s: &str) -> Str {
        Str {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// # Safety
    /// `ptr` must point to `len` readable bytes for the lifetime `'a`.
    pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 {
            &[]
        } else {
            std::slice::from_raw_parts(self.ptr, self.len)
        }
    }
}

/// Where a callee writes bytes for its caller: `write` copies them into the caller's memory.
/// It may be called several times (the pieces are concatenated).
#[repr(C)]
pub struct Writer {
    pub ctx: *mut c_void,
    pub write: unsafe extern "C" fn(ctx: *mut c_void, bytes: Str),
}

/// Services the host offers to a plugin instance. Host-owned and never freed while the library is
/// loaded (a plugin may keep its address); every
/// function is thread-safe and may be called from threads the plugin started.
#[repr(C)]
pub struct HostApi {
    pub struct_size: u32,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub ctx: *mut c_void,
    /// A log line into the host's log, under the plugin's name.
    pub log: unsafe extern "C" fn(ctx: *mut c_void, level: u32, target: Str, message: Str),
    /// Levels above this are dropped by the host; plugins may skip formatting them.
    pub max_level: u32,
    pub _reserved: u32,
    /// Credit a payment `{"meter","amount_cents","reference","phone"?,"raw"?}` (payment sources,
    /// and sinks with a downlink such as cloud MQTT commands).
    /// Returns only after the credit is committed: `OK` with the result JSON (a duplicate
    /// reference is `OK` with the first result), `REJECTED` with a reason (unknown meter, bad
    /// amount), `BUSY` when the host cannot take it now.
    pub submit_payment:
        unsafe extern "C" fn(ctx: *mut c_void, payment: Str, out: *mut Writer) -> Status,
    /// `OK` when the meter number exists, `REJECTED` when it does not.
    pub validate_account:
        unsafe extern "C" fn(ctx: *mut c_void, meter: Str, out: *mut Writer) -> Status,
    /// A downlink `{"meter","command":"relay"|"config","payload":{…}}`: `OK` once handed to the
    /// meter's connection, `BUSY` when the meter is not connected, `REJECTED` for an unknown meter.
    pub submit_command:
        unsafe extern "C" fn(ctx: *mut c_void, command: Str, out: *mut Writer) -> Status,
    /// The plugin's own durable key-value store: `OK` with the value, `REJECTED` when absent.
    pub kv_get: unsafe extern "C" fn(ctx: *mut c_void, key: Str, out: *mut Writer) -> Status,
    /// Stores (durably, before returning `OK`) or, with an empty value, deletes a key.
    pub kv_put:
        unsafe extern "C" fn(ctx: *mut c_void, key: Str, value: Str, out: *mut Writer) -> Status,
    /// Minor 1. Keeps a payment that moved money but credits no meter
    /// `{"reference","amount_cents","account","phone"?,"reason","raw"?}` for the operator
    /// (`umeme-gateway payment list --unapplied`, `payment apply`). `OK` once durable (also for
    /// a reference already kept or credited), `REJECTED` when the gateway's store of unapplied
    /// payments is full or the record is malformed, `BUSY` when it cannot take it now. Absent in
    /// a host of minor 0: read `struct_size` first ([`HostApi::has_record_unapplied`]).
    pub record_unapplied:
        unsafe extern "C" fn(ctx: *mut c_void, unapplied: Str, out: *mut Writer) -> Status,
    /// Minor 2. Whether a payer may pay `amount_cents` to `meter` now, before the money moves
    /// (M-Pesa C2B validation): `OK` when the meter exists and the amount is at least its
    /// tariff's minimum top-up; `REJECTED` with `unknown_meter: …` or
    /// `below_minimum_topup: …` (a sentence for the payer after the colon). Absent in a host
    /// older than minor 2: read `struct_size` first ([`HostApi::has_validate_payment`]).
    pub validate_payment: unsafe extern "C" fn(
        ctx: *mut c_void,
        meter: Str,
        amount_cents: i64,
        out: *mut Writer,
    ) -> Status,
}

/// The size of a minor-0 host table: the least a plugin accepts. Fields past it are read only
/// after checking `struct_size` (so a plugin built on a newer SDK loads into an older gateway).
pub const HOST_API_MINOR_0_SIZE: usize = std::mem::offset_of!(HostApi, record_unapplied);

/// The size of a minor-1 host table (it ends with `record_unapplied`).
pub const HOST_API_MINOR_1_SIZE: usize = std::mem::offset_of!(HostApi, validate_payment);

impl HostApi {
    /// Whether the host's table reaches `validate_payment` (minor 2 or later).
    pub fn has_validate_payment(&self) -> bool {
        self.struct_size as usize
            >= std::mem::offset_of!(HostApi, validate_payment)
                + std::mem::size_of::<*const c_void>()
    }

    /// Whether the host's table reaches `record_unapplied` (minor 1 or later).
    pub fn has_record_unapplied(&self) -> bool {
        self.struct_size as usize
            >= std::mem::offset_of!(HostApi, record_unapplied)
                + std::mem::size_of::<*const c_void>()
    }
}

/// Creates an instance from its config (the plugin's TOML table as a JSON object).
pub type CreateFn = unsafe extern "C" fn(
    host: *const HostApi,
    config: Str,
    out_instance: *mut *mut c_void,
    err: *mut Writer,
) -> Status;

#[repr(C)]
pub struct SinkVTable {
    pub struct_size: u32,
    pub _reserved: u32,
    pub create: CreateFn,
    /// Delivers a batch: a JSON array of events (contract §6), oldest first. `OK`, `RETRYABLE`
    /// (with `out_retry_after_ms` when the far end asked for a delay), `PERMANENT`,
    /// `BAD_CONFIG`, or `REJECTED` with `[{"seq","reason"}]` written to `out`; other statuses
    /// write their reason to `out`.
    pub deliver: unsafe extern "C" fn(
        instance: *mut c_void,
        batch: Str,
        timeout_ms: u32,
        out_retry_after_ms: *mut u32,
        out: *mut Writer,
    ) -> Status,
    /// Writes a JSON health object `{"ok":bool,"detail":…}`.
    pub health: unsafe extern "C" fn(instance: *mut c_void, out: *mut Writer) -> Status,
    pub destroy: unsafe extern "C" fn(instance: *mut c_void),
}

#[repr(C)]
pub struct SourceVTable {
    pub struct_size: u32,
    pub _reserved: u32,
    pub create: CreateFn,
    /// Starts the source's own threads (listeners, pollers); returns once it runs.
    pub start: unsafe extern "C" fn(instance: *mut c_void, err: *mut Writer) -> Status,
    pub health: unsafe extern "C" fn(instance: *mut c_void, out: *mut Writer) -> Status,
    /// Stops and joins every thread of the source; no host call happens after it returns.
    pub stop: unsafe extern "C" fn(instance: *mut c_void),
    pub destroy: unsafe extern "C" fn(instance: *mut c_void),
}

#[repr(C)]
pub struct Declaration {
    pub magic: u64,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub struct_size: u32,
    pub kind: u32,
    pub _reserved: u32,
    /// NUL-terminated UTF-8.
    pub name: *const c_char,
    pub plugin_version: *const c_char,
    pub sdk_version: *const c_char,
    pub rustc_version: *const c_char,
    pub sink: *const SinkVTable,
    pub source: *const SourceVTable,
}

// The declaration and vtables are immutable statics.
unsafe impl Sync for Declaration {}
unsafe impl Sync for SinkVTable {}
unsafe impl Sync for SourceVTable {}
unsafe impl Send for HostApi {}
unsafe impl Sync for HostApi {}

pub type DeclareFn = unsafe extern "C" fn() -> *const Declaration;
