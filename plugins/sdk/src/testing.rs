//! Test a plugin without a gateway: the harnesses call your type through the same C entry
//! points the gateway uses, against an in-memory fake host.
//!
//! ```no_run
//! # use umeme_plugin_sdk::{testing::{SinkHarness, event}, Delivery};
//! # struct MySink;
//! # impl umeme_plugin_sdk::Sink for MySink {
//! #   const NAME: &'static std::ffi::CStr = c"x"; type Config = serde_json::Value;
//! #   fn create(_: serde_json::Value, _: umeme_plugin_sdk::Host) -> Result<Self, String> { Ok(MySink) }
//! #   fn deliver(&mut self, _: &[umeme_plugin_sdk::Event], _: std::time::Duration) -> Delivery { Delivery::Delivered }
//! # }
//! let mut sink = SinkHarness::<MySink>::new(serde_json::json!({})).unwrap();
//! let batch = [event(1, "payment", "METER001", serde_json::json!({"amount": 100}))];
//! assert_eq!(sink.deliver(&batch), Delivery::Delivered);
//! ```

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::abi::{self, HostApi, Status, Str, Writer};
use crate::{Command, Delivery, Event, Health, Payment, PaymentResult, PaymentSource, Sink};

/// A gateway event for tests.
pub fn event(seq: i64, kind: &str, meter: &str, data: serde_json::Value) -> Event {
    Event {
        id: format!("test-site-{seq:012}"),
        seq,
        gateway: "test-site".into(),
        kind: kind.into(),
        meter: Some(meter.into()),
        at: 1_764_230_400_000 + seq,
        data,
    }
}

/// What the fake host recorded. Credits use the original tariff (0.05 units per KES).
#[derive(Default)]
pub struct FakeHost {
    pub logs: Mutex<Vec<(log::Level, String)>>,
    pub meters: Mutex<HashSet<String>>,
    pub payments: Mutex<Vec<Payment>>,
    pub balances_wh: Mutex<HashMap<String, i64>>,
    pub commands: Mutex<Vec<Command>>,
    pub kv: Mutex<HashMap<String, String>>,
    /// Payments handed to `record_unapplied`, one per reference.
    pub unapplied: Mutex<Vec<crate::Unapplied>>,
    /// When set, `record_unapplied` refuses with this reason (a full store).
    pub refuse_unapplied: Mutex<Option<String>>,
    /// A gateway of ABI minor 0: its table ends before `record_unapplied`.
    pub minor_0: bool,
    /// A gateway of ABI minor 1: its table ends before `validate_payment`.
    pub minor_1: bool,
    /// Every meter's minimum top-up for `validate_payment`, in cents (0: none).
    pub minimum_topup_cents: i64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

unsafe fn host<'a>(ctx: *mut c_void) -> &'a FakeHost {
    unsafe { &*(ctx as *const FakeHost) }
}

unsafe fn text(s: Str) -> String {
    String::from_utf8_lossy(unsafe { s.as_bytes() }).into_owned()
}

unsafe fn reply(out: *mut Writer, status: Status, msg: &str) -> Status {
    unsafe { crate::ffi::write(out, msg) };
    status
}

unsafe extern "C" fn fake_log(ctx: *mut c_void, level: u32, _target: Str, message: Str) {
    let level = match level {
        abi::LEVEL_ERROR => log::Level::Error,
        abi::LEVEL_WARN => log::Level::Warn,
        abi::LEVEL_INFO => log::Level::Info,
        abi::LEVEL_DEBUG => log::Level::Debug,
        _ => log::Level::Trace,
    };
    let h = unsafe { host(ctx) };
    lock(&h.logs).push((level, unsafe { text(message) }));
}

unsafe extern "C" fn fake_submit_payment(
    ctx: *mut c_void,
    payment: Str,
    out: *mut Writer,
) -> Status {
    let h = unsafe { host(ctx) };
    let p: Payment = match serde_json::from_slice(unsafe { payment.as_bytes() }) {
        Ok(p) => p,
        Err(e) => return unsafe { reply(out, abi::REJECTED, &format!("bad payment: {e}")) },
    };
    if !lock(&h.meters).contains(&p.meter) {
        return unsafe { reply(out, abi::REJECTED, &format!("unknown meter {}", p.meter)) };
    }
    if p.amount_cents <= 0 {
        return unsafe { reply(out, abi::REJECTED, "amount must be positive") };
    }
    let mut payments = lock(&h.payments);
    let mut balances = lock(&h.balances_wh);
    let credit_wh = p.amount_cents / 2;
    let result = match payments.iter().find(|q| q.reference == p.reference) {
        Some(first) => PaymentResult {
            duplicate: true,
            credit_wh: first.amount_cents / 2,
            balance_wh: balances.get(&first.meter).copied().unwrap_or(0),
        },
        None => {
            let b = balances.entry(p.meter.clone()).or_insert(0);
            *b += credit_wh;
            let r = PaymentResult {
                duplicate: false,
                credit_wh,
                balance_wh: *b,
            };
            payments.push(p);
            r
        }
    };
    unsafe {
        reply(
            out,
            abi::OK,
            &serde_json::to_string(&result).unwrap_or_default(),
        )
    }
}

unsafe extern "C" fn fake_validate_account(
    ctx: *mut c_void,
    meter: Str,
    out: *mut Writer,
) -> Status {
    let h = unsafe { host(ctx) };
    if lock(&h.meters).contains(&unsafe { text(meter) }) {
        abi::OK
    } else {
        unsafe { reply(out, abi::REJECTED, "unknown meter") }
    }
}

unsafe extern "C" fn fake_submit_command(
    ctx: *mut c_void,
    command: Str,
    out: *mut Writer,
) -> Status {
    let h = unsafe { host(ctx) };
    match serde_json::from_slice::<Command>(unsafe { command.as_bytes() }) {
        Ok(c) if lock(&h.meters).contains(&c.meter) => {
            lock(&h.commands).push(c);
            abi::OK
        }
        Ok(c) => unsafe { reply(out, abi::REJECTED, &format!("unknown meter {}", c.meter)) },
        Err(e) => unsafe { reply(out, abi::REJECTED, &format!("bad command: {e}")) },
    }
}

unsafe extern "C" fn fake_kv_get(ctx: *mut c_void, key: Str, out: *mut Writer) -> Status {
    let h = unsafe { host(ctx) };
    match lock(&h.kv).get(&unsafe { text(key) }) {
        Some(v) => unsafe { reply(out, abi::OK, v) },
        None => abi::REJECTED,
    }
}

unsafe extern "C" fn fake_kv_put(
    ctx: *mut c_void,
    key: Str,
    value: Str,
    _out: *mut Writer,
) -> Status {
    let h = unsafe { host(ctx) };
    let (key, value) = unsafe { (text(key), text(value)) };
    if value.is_empty() {
        lock(&h.kv).remove(&key);
    } else {
        lock(&h.kv).insert(key, value);
    }
    abi::OK
}

unsafe extern "C" fn fake_record_unapplied(
    ctx: *mut c_void,
    unapplied: Str,
    out: *mut Writer,
) -> Status {
    let h = unsafe { host(ctx) };
    if let Some(why) = lock(&h.refuse_unapplied).clone() {
        return unsafe { reply(out, abi::REJECTED, &why) };
    }
    match serde_json::from_str::<crate::Unapplied>(&unsafe { text(unapplied) }) {
        Ok(u) => {
            let mut kept = lock(&h.unapplied);
            if !kept.iter().any(|k| k.reference == u.reference) {
                kept.push(u);
            }
            abi::OK
        }
        Err(e) => unsafe { reply(out, abi::REJECTED, &format!("bad record: {e}")) },
    }
}

unsafe extern "C" fn fake_validate_payment(
    ctx: *mut c_void,
    meter: Str,
    amount_cents: i64,
    out: *mut Writer,
) -> Status {
    let h = unsafe { host(ctx) };
    let meter = unsafe { text(meter) };
    if !lock(&h.meters).contains(&meter) {
        return unsafe { reply(out, abi::REJECTED, &format!("unknown_meter: {meter}")) };
    }
    if amount_cents < h.minimum_topup_cents {
        let msg = format!(
            "below_minimum_topup: the minimum top-up is KES {}.{:02}",
            h.minimum_topup_cents / 100,
            h.minimum_topup_cents % 100
        );
        return unsafe { reply(out, abi::REJECTED, &msg) };
    }
    abi::OK
}

/// The fake host's function table and the host it points to. Both are leaked, as the gateway
/// does: the plugin's global logger may still hold the table after its instance is destroyed
/// (another test's harness, a thread of the plugin), so freeing it could be a use after free.
struct FakeTable {
    api: &'static HostApi,
    host: Arc<FakeHost>,
}

impl FakeTable {
    fn new(host: Arc<FakeHost>) -> FakeTable {
        std::mem::forget(Arc::clone(&host));
        let (struct_size, abi_minor) = if host.minor_0 {
            (abi::HOST_API_MINOR_0_SIZE, 0)
        } else if host.minor_1 {
            (abi::HOST_API_MINOR_1_SIZE, 1)
        } else {
            (std::mem::size_of::<HostApi>(), abi::ABI_MINOR)
        };
        let api = Box::leak(Box::new(HostApi {
            struct_size: struct_size as u32,
            abi_major: abi::ABI_MAJOR,
            abi_minor,
            ctx: Arc::as_ptr(&host) as *mut c_void,
            log: fake_log,
            max_level: abi::LEVEL_TRACE,
            _reserved: 0,
            submit_payment: fake_submit_payment,
            validate_account: fake_validate_account,
            submit_command: fake_submit_command,
            kv_get: fake_kv_get,
            kv_put: fake_kv_put,
            record_unapplied: fake_record_unapplied,
            validate_payment: fake_validate_payment,
        }));
        FakeTable { api, host }
    }
}

fn call_out(f: impl FnOnce(*mut Writer) -> Status) -> (Status, String) {
    let mut buf = Vec::new();
    let mut w = crate::ffi::writer_into(&mut buf);
    let status = f(&mut w);
    (status, String::from_utf8_lossy(&buf).into_owned())
}

fn create_instance(
    table: &FakeTable,
    config: &serde_json::Value,
    create: abi::CreateFn,
) -> Result<*mut c_void, String> {
    let json = config.to_string();
    let mut inst = std::ptr::null_mut();
    // SAFETY: the table outlives the instance (both owned by the harness).
    let (status, err) = call_out(|w| unsafe { create(table.api, Str::new(&json), &mut inst, w) });
    if status == abi::OK {
        Ok(inst)
    } else {
        Err(format!("create failed ({status}): {err}"))
    }
}

fn parse_health(status: Status, text: String) -> Health {
    if status == abi::OK {
        serde_json::from_str(&text).unwrap_or_else(|_| Health::failing(text))
    } else {
        Health::failing(format!("health failed ({status}): {text}"))
    }
}

/// A sink driven through its C entry points, as the gateway drives it.
pub struct SinkHarness<T: Sink> {
    table: FakeTable,
    inst: *mut c_void,
    _t: PhantomData<T>,
}

impl<T: Sink> SinkHarness<T> {
    /// Creates the sink from a `[sink.config]`-like JSON object.
    pub fn new(config: serde_json::Value) -> Result<Self, String> {
        Self::with_meters(config, &[])
    }

    /// Like `new`, with a fake host that knows `meters` (for sinks with a downlink that credit
    /// payments or send commands through the host).
    pub fn with_meters(config: serde_json::Value, meters: &[&str]) -> Result<Self, String> {
        let host = Arc::new(FakeHost::default());
        lock(&host.meters).extend(meters.iter().map(|m| m.to_string()));
        let table = FakeTable::new(host);
        let inst = create_instance(&table, &config, crate::ffi::sink_create::<T>)?;
        Ok(SinkHarness {
            table,
            inst,
            _t: PhantomData,
        })
    }

    /// Delivers a batch with a 30 s budget.
    pub fn deliver(&mut self, batch: &[Event]) -> Delivery {
        self.deliver_within(batch, Duration::from_secs(30))
    }

    pub fn deliver_within(&mut self, batch: &[Event], timeout: Duration) -> Delivery {
        let json = serde_json::to_string(batch).unwrap_or_default();
        let mut retry_after = 0u32;
        let ms = timeout.as_millis().min(u128::from(u32::MAX)) as u32;
        let (status, text) = call_out(|w| unsafe {
            crate::ffi::sink_deliver::<T>(self.inst, Str::new(&json), ms, &mut retry_after, w)
        });
        match status {
            abi::OK => Delivery::Delivered,
            abi::RETRYABLE => Delivery::Retry {
                after: (retry_after > 0).then(|| Duration::from_millis(u64::from(retry_after))),
                reason: text,
            },
            abi::BAD_CONFIG => Delivery::BadConfig(text),
            abi::REJECTED => {
                let list: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
                Delivery::Rejected(
                    list.iter()
                        .map(|v| {
                            (
                                v["seq"].as_i64().unwrap_or(0),
                                v["reason"].as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect(),
                )
            }
            abi::PANICKED => Delivery::Retry {
                after: None,
                reason: format!("panicked: {text}"),
            },
            _ => Delivery::Permanent(text),
        }
    }

    pub fn health(&mut self) -> Health {
        let (status, text) = call_out(|w| unsafe { crate::ffi::sink_health::<T>(self.inst, w) });
        parse_health(status, text)
    }

    /// The fake host: payments credited, commands queued, the key-value store, logs.
    pub fn host(&self) -> &FakeHost {
        &self.table.host
    }

    /// The plugin's log lines so far (its `log` calls and panic messages).
    pub fn logs(&self) -> Vec<(log::Level, String)> {
        lock(&self.table.host.logs).clone()
    }
}

impl<T: Sink> Drop for SinkHarness<T> {
    fn drop(&mut self) {
        unsafe { crate::ffi::sink_destroy::<T>(self.inst) };
    }
}

/// A payment source driven through its C entry points, against a fake host that knows
/// `meters` and records payments, commands and the key-value store.
pub struct SourceHarness<T: PaymentSource> {
    table: FakeTable,
    inst: *mut c_void,
    started: bool,
    _t: PhantomData<T>,
}

impl<T: PaymentSource> SourceHarness<T> {
    pub fn new(config: serde_json::Value, meters: &[&str]) -> Result<Self, String> {
        Self::with_host(FakeHost::default(), config, meters)
    }

    /// Like `new`, against a gateway of ABI minor 0 (a host table without the callbacks
    /// minor 1 added), to check a plugin still works there.
    pub fn on_minor_0(config: serde_json::Value, meters: &[&str]) -> Result<Self, String> {
        let host = FakeHost {
            minor_0: true,
            ..FakeHost::default()
        };
        Self::with_host(host, config, meters)
    }

    /// Against a fake host set up by the test (a minimum top-up, an older ABI minor).
    pub fn with_host(
        host: FakeHost,
        config: serde_json::Value,
        meters: &[&str],
    ) -> Result<Self, String> {
        let host = Arc::new(host);
        lock(&host.meters).extend(meters.iter().map(|m| m.to_string()));
        let table = FakeTable::new(host);
        let inst = create_instance(&table, &config, crate::ffi::source_create::<T>)?;
        Ok(SourceHarness {
            table,
            inst,
            started: false,
            _t: PhantomData,
        })
    }

    pub fn start(&mut self) -> Result<(), String> {
        let (status, text) = call_out(|w| unsafe { crate::ffi::source_start::<T>(self.inst, w) });
        if status == abi::OK {
            self.started = true;
            Ok(())
        } else {
            Err(format!("start failed ({status}): {text}"))
        }
    }

    pub fn health(&mut self) -> Health {
        let (status, text) = call_out(|w| unsafe { crate::ffi::source_health::<T>(self.inst, w) });
        parse_health(status, text)
    }

    pub fn stop(&mut self) {
        if std::mem::take(&mut self.started) {
            unsafe { crate::ffi::source_stop::<T>(self.inst) };
        }
    }

    /// The fake host: payments credited, commands queued, the key-value store, logs.
    pub fn host(&self) -> &FakeHost {
        &self.table.host
    }
}

impl<T: PaymentSource> Drop for SourceHarness<T> {
    fn drop(&mut self) {
        self.stop();
        unsafe { crate::ffi::source_destroy::<T>(self.inst) };
    }
}
