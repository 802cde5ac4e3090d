//! The generated entry points: every `unsafe` of the SDK lives here. Each entry point checks
//! its pointers, runs the plugin's code inside `catch_unwind`, and maps the result to a status.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Once;
use std::time::Duration;

use crate::abi::{self, HostApi, Status, Str, Writer};
use crate::{Delivery, Event, Health, Host, PaymentSource, Sink};

/// A plugin instance, the host table it was created with, and whether a panic poisoned it.
struct Instance<T> {
    value: T,
    host: *const HostApi,
    poisoned: bool,
}

unsafe extern "C" fn push_vec(ctx: *mut c_void, bytes: Str) {
    // SAFETY: `ctx` is the `Vec<u8>` given to `writer_into`, alive for the call.
    let buf = unsafe { &mut *(ctx as *mut Vec<u8>) };
    buf.extend_from_slice(unsafe { bytes.as_bytes() });
}

/// A writer that appends to `buf`.
pub fn writer_into(buf: &mut Vec<u8>) -> Writer {
    Writer {
        ctx: buf as *mut Vec<u8> as *mut c_void,
        write: push_vec,
    }
}

/// Writes `text` to the caller's writer, if there is one.
///
/// # Safety
/// `w` is null or a valid writer for the duration of the call.
pub unsafe fn write(w: *mut Writer, text: &str) {
    if let Some(w) = unsafe { w.as_mut() } {
        unsafe { (w.write)(w.ctx, Str::new(text)) };
    }
}

/// The host of the most recent live instance: where `log` lines from the plugin's own threads
/// go. Cleared when that instance is destroyed.
static HOST: AtomicPtr<HostApi> = AtomicPtr::new(std::ptr::null_mut());

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    /// The host of the instance this thread is calling into, while an entry point runs: with
    /// several instances of one library (or harnesses in parallel tests), each call's log lines
    /// and panic message go to its own host.
    static CURRENT: Cell<*const HostApi> = const { Cell::new(std::ptr::null()) };
}

/// Makes `host` the thread's [`CURRENT`] host until dropped.
struct CallScope(*const HostApi);

impl CallScope {
    fn enter(host: *const HostApi) -> CallScope {
        CallScope(CURRENT.with(|c| c.replace(host)))
    }
}

impl Drop for CallScope {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// Where a log line of this thread goes: the host being called, else the latest instance's.
fn log_host() -> *const HostApi {
    let current = CURRENT.with(Cell::get);
    if current.is_null() {
        HOST.load(Ordering::Acquire)
    } else {
        current
    }
}

struct Forward;

impl log::Log for Forward {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        let host = log_host();
        // SAFETY: a host table outlives its instances (ABI rule); only read.
        !host.is_null() && (m.level() as u32) <= unsafe { (*host).max_level }
    }

    fn log(&self, record: &log::Record<'_>) {
        let host = log_host();
        // SAFETY: as in `enabled`; the function is thread-safe (ABI rule).
        if host.is_null() || (record.level() as u32) > unsafe { (*host).max_level } {
            return;
        }
        let msg = record.args().to_string();
        unsafe {
            ((*host).log)(
                (*host).ctx,
                record.level() as u32,
                Str::new(record.target()),
                Str::new(&msg),
            );
        }
    }

    fn flush(&self) {}
}

static FORWARD: Forward = Forward;
static HOOKS: Once = Once::new();

/// Points `log` and panic messages at `host`; installs the logger and hook once per library.
fn attach(host: *const HostApi) {
    HOST.store(host as *mut HostApi, Ordering::Release);
    HOOKS.call_once(|| {
        // This library has its own copies of `log` and std: its own logger and panic hook.
        let _ = log::set_logger(&FORWARD);
        log::set_max_level(log::LevelFilter::Trace);
        // Panics outside an entry point (a thread of the plugin; in a test binary, which shares
        // std with the SDK, the test's own failed asserts) also go to the previous hook.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = match info.payload().downcast_ref::<&str>() {
                Some(s) => s.to_string(),
                None => info
                    .payload()
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "panic".into()),
            };
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let text = format!("plugin panicked: {msg}{at}");
            log::error!("{text}");
            if CURRENT.with(Cell::get).is_null() {
                previous(info);
            } else {
                let _ = LAST_PANIC.try_with(|p| *p.borrow_mut() = Some(text));
            }
        }));
    });
}

fn take_panic() -> String {
    LAST_PANIC
        .with(|p| p.borrow_mut().take())
        .unwrap_or_else(|| "plugin panicked".into())
}

/// Runs `f`, turning a panic into `PANICKED` with its message written to `out`.
unsafe fn guarded(
    out: *mut Writer,
    f: impl FnOnce() -> Result<Status, (Status, String)>,
) -> Status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(s)) => s,
        Ok(Err((s, msg))) => {
            unsafe { write(out, &msg) };
            s
        }
        Err(payload) => {
            // Dropping a panic payload can panic again; leak it instead (a bug path only).
            std::mem::forget(payload);
            unsafe { write(out, &take_panic()) };
            abi::PANICKED
        }
    }
}

unsafe fn create<C: serde::de::DeserializeOwned, T>(
    host: *const HostApi,
    config: Str,
    out_instance: *mut *mut c_void,
    err: *mut Writer,
    make: impl FnOnce(C, Host) -> Result<T, String>,
) -> Status {
    if host.is_null() || out_instance.is_null() {
        unsafe { write(err, "null host table or instance pointer") };
        return abi::BAD_CONFIG;
    }
    // SAFETY: non-null and valid for the instance's lifetime (ABI rule).
    let api = unsafe { &*host };
    if api.abi_major != abi::ABI_MAJOR || (api.struct_size as usize) < abi::HOST_API_MINOR_0_SIZE {
        unsafe { write(err, "the host speaks another plugin ABI") };
        return abi::BAD_CONFIG;
    }
    attach(host);
    let _scope = CallScope::enter(host);
    let config = unsafe { config.as_bytes() };
    let status = unsafe {
        guarded(err, || {
            let cfg: C = serde_json::from_slice(config)
                .map_err(|e| (abi::BAD_CONFIG, format!("plugin config: {e}")))?;
            let value = make(cfg, Host::from_raw(host)).map_err(|e| (abi::BAD_CONFIG, e))?;
            let inst = Box::new(Instance {
                value,
                host,
                poisoned: false,
            });
            *out_instance = Box::into_raw(inst) as *mut c_void;
            Ok(abi::OK)
        })
    };
    if status != abi::OK {
        // No instance holds `host`: the host may free it once `create` returns.
        forget_host(host);
    }
    status
}

/// Runs `f` on a live instance; a panic poisons it.
unsafe fn with_instance<T>(
    inst: *mut c_void,
    out: *mut Writer,
    f: impl FnOnce(&mut T) -> Result<Status, (Status, String)>,
) -> Status {
    let Some(inst) = (unsafe { (inst as *mut Instance<T>).as_mut() }) else {
        unsafe { write(out, "null instance") };
        return abi::PANICKED;
    };
    if inst.poisoned {
        unsafe {
            write(
                out,
                "the instance panicked earlier; the host must recreate it",
            )
        };
        return abi::PANICKED;
    }
    let _scope = CallScope::enter(inst.host);
    let status = unsafe { guarded(out, || f(&mut inst.value)) };
    if status == abi::PANICKED {
        inst.poisoned = true;
    }
    status
}

unsafe fn destroy<T>(inst: *mut c_void) {
    if inst.is_null() {
        return;
    }
    let boxed = unsafe { Box::from_raw(inst as *mut Instance<T>) };
    let host = boxed.host;
    {
        let _scope = CallScope::enter(host);
        if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(boxed))) {
            std::mem::forget(payload);
            // The panic hook already logged it.
            let _ = take_panic();
        }
    }
    // The host may free its table once `destroy` returns.
    forget_host(host);
}

/// Stops sending the plugin's own threads' log lines to `host`, if they went there.
fn forget_host(host: *const HostApi) {
    let _ = HOST.compare_exchange(
        host as *mut HostApi,
        std::ptr::null_mut(),
        Ordering::AcqRel,
        Ordering::Acquire,
    );
}

fn health_json(out: *mut Writer, h: Health) -> Result<Status, (Status, String)> {
    let text = serde_json::to_string(&h).unwrap_or_else(|_| r#"{"ok":false}"#.into());
    unsafe { write(out, &text) };
    Ok(abi::OK)
}

// ---- sinks ----

/// # Safety
/// Called by the host through the ABI only.
pub unsafe extern "C" fn sink_create<T: Sink>(
    host: *const HostApi,
    config: Str,
    out_instance: *mut *mut c_void,
    err: *mut Writer,
) -> Status {
    unsafe { create::<T::Config, T>(host, config, out_instance, err, T::create) }
}

/// # Safety
/// Called by the host through the ABI only.
pub unsafe extern "C" fn sink_deliver<T: Sink>(
    inst: *mut c_void,
    batch: Str,
    timeout_ms: u32,
    out_retry_after_ms: *mut u32,
    out: *mut Writer,
) -> Status {
    let batch = unsafe { batch.as_bytes() };
    unsafe {
        with_instance::<T>(inst, out, |sink| {
            let events: Vec<Event> = serde_json::from_slice(batch).map_err(|e| {
                (
                    abi::PERMANENT,
                    format!("batch is not a JSON array of events: {e}"),
                )
            })?;
            match sink.deliver(&events, Duration::from_millis(u64::from(timeout_ms))) {
                Delivery::Delivered => Ok(abi::OK),
                Delivery::Retry { after, reason } => {
                    if let (Some(a), Some(slot)) = (after, out_retry_after_ms.as_mut()) {
                        *slot = a.as_millis().min(u128::from(u32::MAX)) as u32;
                    }
                    Err((abi::RETRYABLE, reason))
                }
                Delivery::Permanent(reason) => Err((abi::PERMANENT, reason)),
                Delivery::BadConfig(reason) => Err((abi::BAD_CONFIG, reason)),
                Delivery::Rejected(list) => {
                    let list: Vec<serde_json::Value> = list
                        .into_iter()
                        .map(|(seq, reason)| serde_json::json!({"seq": seq, "reason": reason}))
                        .collect();
                    Err((abi::REJECTED, serde_json::Value::Array(list).to_string()))
                }
            }
        })
    }
}

/// # Safety
/// Called by the host through the ABI only.
pub unsafe extern "C" fn sink_health<T: Sink>(inst: *mut c_void, out: *mut Writer) -> Status {
    unsafe { with_instance::<T>(inst, out, |sink| health_json(out, sink.health())) }
}

/// # Safety
/// Called by the host through the ABI only, once, with no call running on the instance.
pub unsafe extern "C" fn sink_destroy<T: Sink>(inst: *mut c_void) {
    unsafe { destroy::<T>(inst) }
}

// ---- payment sources ----

/// # Safety
/// Called by the host through the ABI only.
pub unsafe extern "C" fn source_create<T: PaymentSource>(
    host: *const HostApi,
    config: Str,
    out_instance: *mut *mut c_void,
    err: *mut Writer,
) -> Status {
    unsafe { create::<T::Config, T>(host, config, out_instance, err, T::create) }
}

/// # Safety
/// Called by the host through the ABI only.
pub unsafe extern "C" fn source_start<T: PaymentSource>(
    inst: *mut c_void,
    err: *mut Writer,
) -> Status {
    unsafe {
        with_instance::<T>(inst, err, |s| {
            s.start()
                .map(|()| abi::OK)
                .map_err(|e| (abi::BAD_CONFIG, e))
        })
    }
}

/// # Safety
/// Called by the host through the ABI only.
pub unsafe extern "C" fn source_health<T: PaymentSource>(
    inst: *mut c_void,
    out: *mut Writer,
) -> Status {
    unsafe { with_instance::<T>(inst, out, |s| health_json(out, s.health())) }
}

/// # Safety
/// Called by the host through the ABI only.
pub unsafe extern "C" fn source_stop<T: PaymentSource>(inst: *mut c_void) {
    unsafe {
        with_instance::<T>(inst, std::ptr::null_mut(), |s| {
            s.stop();
            Ok(abi::OK)
        })
    };
}

/// # Safety
/// Called by the host through the ABI only, once, after `stop`.
pub unsafe extern "C" fn source_destroy<T: PaymentSource>(inst: *mut c_void) {
    unsafe { destroy::<T>(inst) }
}
