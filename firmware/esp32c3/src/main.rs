//! Umeme prepaid meter firmware for the ESP32-C3.
//!
//! The board layer only: every decision (RMS current, energy register, balance, relay, the
//! outbox of unacknowledged reports, stale-command rejection, the MQTT 3.1.1 packets, the flash
//! record format) lives in `meter-core`, which is tested on the host.
//!
//! Tasks:
//! - `metering`: samples the ACS712 on GPIO3 (ADC1) once a second, drives the relay (GPIO5) and
//!   the LED (GPIO8) (again at once after every command), takes a numbered report every
//!   `publishIntervalMs` from `command/config` (else `METER_REPORT_S`) and persists the state.
//! - `wifi`: keeps the station connected, with exponential backoff.
//! - `net`: the embassy-net stack.
//! - `main`: MQTT sessions to the gateway, reconnecting with backoff; publishes reports QoS 1
//!   (replayed after every reconnect until PUBACKed), power trips and refused configs as
//!   statuses, applies `command/#`, and drives over-the-air updates (`updates`, `ota_slots`).
//!
//! The flash (`flash`) is shared: the state log, the OTA state log and the OTA slots.
//!
//! Settings come from the build environment (see `config`), so a meter is built per site.

#![no_std]
#![no_main]

extern crate alloc;

mod config;
mod flash;
mod identity;
mod link;
mod ota_slots;
mod session;
mod updates;

use core::cell::RefCell;

use embassy_executor::Spawner;
use embassy_futures::select::{select, Either};
use embassy_net::{Runner, StackResources};
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::blocking_mutex::Mutex;
use embassy_sync::mutex::Mutex as AsyncMutex;
use embassy_sync::signal::Signal;
use embassy_time::{Duration, Instant, Ticker, Timer};
use esp_backtrace as _;
use esp_hal::analog::adc::{Adc, AdcCalCurve, AdcConfig, AdcPin, Attenuation};
use esp_hal::clock::CpuClock;
use esp_hal::gpio::{Level, Output, OutputConfig};
use esp_hal::peripherals::{ADC1, GPIO3};
use esp_hal::ram;
use esp_hal::rng::Rng;
use esp_hal::timer::timg::TimerGroup;
use esp_println::println;
use esp_radio::wifi::sta::StationConfig;
use esp_radio::wifi::{
    AuthenticationMethodConfig, Config as WifiConfig, ControllerConfig, Interface, WifiController,
};
use esp_storage::FlashStorage;
use meter_core::flashlog::FlashLog;
use meter_core::sensor::{Acs712, Calibration};
use meter_core::snapshot::state_len;
use meter_core::{BalanceState, Meter, MeterConfig, Relay};

// The app descriptor carries the version the OTA machine runs as (`METER_FW_VERSION`).
esp_bootloader_esp_idf::esp_app_desc!(
    config::FW_VERSION,
    env!("CARGO_PKG_NAME"),
    esp_bootloader_esp_idf::BUILD_TIME,
    esp_bootloader_esp_idf::BUILD_DATE,
    esp_bootloader_esp_idf::ESP_IDF_COMPATIBLE_VERSION,
    esp_bootloader_esp_idf::MMU_PAGE_SIZE,
    0,
    u16::MAX,
    esp_bootloader_esp_idf::SECURE_VERSION
);

/// Reports kept while the gateway is unreachable; the saved state must fit one flash sector.
pub const OUTBOX: usize = 96;
const _: () = assert!(state_len(OUTBOX) <= FlashLog::<flash::Shared>::max_record());

/// ADC samples per RMS window: at ~20 µs per oneshot read this spans several 50 Hz cycles.
const WINDOW: usize = 200;

type CurrentPin = AdcPin<GPIO3<'static>, ADC1<'static>, AdcCalCurve<ADC1<'static>>>;
type Log = FlashLog<flash::Shared>;

static METER: Mutex<CriticalSectionRawMutex, RefCell<Option<Meter<OUTBOX>>>> =
    Mutex::new(RefCell::new(None));

/// The flash log. An async mutex: a sector erase takes tens of milliseconds and must not run
/// inside the meter's critical section.
static LOG: AsyncMutex<CriticalSectionRawMutex, Option<Log>> = AsyncMutex::new(None);

/// Raised when a new report waits, so the session sends it without waiting for its tick.
pub static REPORT_READY: Signal<CriticalSectionRawMutex, ()> = Signal::new();

/// Raised after every command: the metering task sets the relay and LED from the meter at
/// once (a balance, `mayCut`, relay or config command can change them).
pub static APPLY_RELAY: Signal<CriticalSectionRawMutex, ()> = Signal::new();

/// Runs `f` on the meter, in a short critical section (never across an await).
pub fn with_meter<R>(f: impl FnOnce(&mut Meter<OUTBOX>) -> R) -> R {
    METER.lock(|m| {
        let mut m = m.borrow_mut();
        // Set in `main` before any task starts.
        f(m.as_mut().expect("meter state initialised"))
    })
}

/// Changes the meter with `f` and, when it says so, writes the durable state as the newest
/// flash record. The log stays locked from the change to the write, so a record is never
/// overtaken by an older state, and a report is on flash before the session can see it (the
/// session takes the same lock to pick reports up).
pub async fn change_and_save<R>(f: impl FnOnce(&mut Meter<OUTBOX>) -> (R, bool)) -> R {
    let mut guard = LOG.lock().await;
    let mut buf = [0u8; state_len(OUTBOX)];
    let (r, encoded) = with_meter(|m| {
        let (r, save) = f(m);
        (r, save.then(|| m.encode_state(&mut buf)))
    });
    let saved = match (encoded, guard.as_mut()) {
        (None, _) => true,
        (Some(Ok(n)), Some(log)) => log.append(&buf[..n]).is_ok(),
        _ => false,
    };
    if !saved {
        println!("flash: saving the meter state failed");
    }
    r
}

/// Up to `limit` reports for the session to send now (marked sent): only ones already on flash.
pub async fn persisted_reports<const K: usize>(
    limit: usize,
) -> heapless::Vec<meter_core::Report, K> {
    let _on_flash = LOG.lock().await;
    let mut out = heapless::Vec::new();
    with_meter(|m| {
        while !out.is_full() && out.len() < limit {
            match m.next_to_send() {
                Some(r) => {
                    let _ = out.push(r);
                }
                None => break,
            }
        }
    });
    out
}

macro_rules! mk_static {
    ($t:ty, $val:expr) => {{
        static STATIC_CELL: static_cell::StaticCell<$t> = static_cell::StaticCell::new();
        #[deny(unused_attributes)]
        let x = STATIC_CELL.uninit().write(($val));
        x
    }};
}

#[esp_hal::main]
async fn main(spawner: Spawner) -> ! {
    esp_println::logger::init_logger_from_env();
    let p = esp_hal::init(esp_hal::Config::default().with_cpu_clock(CpuClock::max()));
    esp_alloc::heap_allocator!(#[ram(reclaimed)] size: 64 * 1024);
    esp_alloc::heap_allocator!(size: 36 * 1024);
    let timg0 = TimerGroup::new(p.TIMG0);
    esp_rtos::start(timg0.timer0, p.FROM_CPU_INTR0);

    // State first: the register and seq survive reboots.
    let meter_config = MeterConfig {
        voltage_mv: config::VOLTAGE_MV,
        power_factor_permille: config::POWER_FACTOR_PERMILLE,
        low_balance_wh: config::LOW_BALANCE_WH,
    };
    flash::init(FlashStorage::new(p.FLASH));
    let id = identity::load();
    let mut log = FlashLog::new(flash::Shared, config::FLASH_OFFSET, config::FLASH_SECTORS);
    let mut buf = [0u8; state_len(OUTBOX)];
    let meter = match log.load(&mut buf) {
        Ok(Some(n)) => match Meter::restore(meter_config, &buf[..n]) {
            Ok(m) => m,
            Err(e) => {
                println!("flash: saved state unreadable ({e}); starting fresh");
                Meter::new(meter_config)
            }
        },
        Ok(None) => Meter::new(meter_config),
        Err(e) => {
            println!("flash: {e:?}; starting fresh");
            Meter::new(meter_config)
        }
    };
    println!(
        "meter {}: register {} Wh, next seq {}, {} reports waiting",
        id.meter_id,
        meter.energy_wh(),
        meter.next_seq(),
        meter.outbox().len()
    );
    METER.lock(|m| m.replace(Some(meter)));
    *LOG.lock().await = Some(log);

    // Relay open and LED off until the balance is known.
    let relay = Output::new(p.GPIO5, Level::Low, OutputConfig::default());
    let led = Output::new(p.GPIO8, Level::High, OutputConfig::default()); // active low
    let mut adc_config = AdcConfig::new();
    let pin: CurrentPin = adc_config
        .enable_pin_with_cal::<_, AdcCalCurve<ADC1<'static>>>(p.GPIO3, Attenuation::_11dB);
    let adc = Adc::new(p.ADC1, adc_config).into_async();
    spawner.spawn(metering(adc, pin, relay, led).expect("metering task"));

    let station = WifiConfig::Station(
        StationConfig::default()
            .with_ssid(id.wifi_ssid.try_into().expect("WIFI_SSID of 1..=32 bytes"))
            .with_authentication(AuthenticationMethodConfig::Wpa2Personal(
                id.wifi_password
                    .try_into()
                    .expect("WIFI_PASSWORD of 8..=64 bytes"),
            )),
    );
    let controller = WifiController::new(
        p.WIFI,
        ControllerConfig::default().with_initial_config(station),
    )
    .expect("WiFi controller");
    let rng = Rng::new();
    let seed = ((rng.random() as u64) << 32) | rng.random() as u64;
    let (stack, runner) = embassy_net::new(
        Interface::station(),
        embassy_net::Config::dhcpv4(Default::default()),
        mk_static!(StackResources<3>, StackResources::<3>::new()),
        seed,
    );
    spawner.spawn(wifi(controller).expect("wifi task"));
    spawner.spawn(net(runner).expect("net task"));

    let mut updates = updates::Updates::boot(session::MAX_OTA_CHUNK);
    if updates.on_trial() {
        spawner.spawn(updates::trial_watch().expect("trial watch task"));
    }
    session::run_forever(stack, &mut updates).await
}

/// Samples, integrates, decides the relay, and takes the periodic report.
#[embassy_executor::task]
async fn metering(
    mut adc: Adc<'static, ADC1<'static>, esp_hal::Async>,
    mut pin: CurrentPin,
    mut relay: Output<'static>,
    mut led: Output<'static>,
) {
    let mut cal = Calibration::new(Acs712::A20);
    let mut window = [0u16; WINDOW];
    // Zero offset with the relay still open: no load current flows.
    for s in window.iter_mut() {
        *s = adc.read_oneshot(&mut pin).await;
    }
    let zero = cal.calibrate_zero(&window);
    println!("ACS712 zero at {zero} mV");

    let mut ticker = Ticker::every(Duration::from_secs(1));
    let mut last = Instant::now();
    // The first report 5 s after boot, then one per interval (read every window, so a new
    // `publishIntervalMs` takes effect at once).
    let mut last_report = Instant::now() + Duration::from_secs(5);
    let mut first = true;
    let mut blink = false;
    loop {
        if let Either::Second(()) = select(ticker.next(), APPLY_RELAY.wait()).await {
            // A command: set the relay and LED now, measure at the next tick.
            let (relay_state, balance_state) = with_meter(|m| (m.relay(), m.state()));
            set_outputs(&mut relay, &mut led, relay_state, balance_state, blink);
            continue;
        }
        for s in window.iter_mut() {
            *s = adc.read_oneshot(&mut pin).await;
        }
        let now = Instant::now();
        let dt_ms = (now - last).as_millis().min(u32::MAX as u64) as u32;
        last = now;
        let current_ma = cal.rms_milliamps(&window);
        let interval = with_meter(|m| m.publish_interval_ms())
            .map_or(Duration::from_secs(config::REPORT_S), |ms| {
                Duration::from_millis(u64::from(ms))
            });
        let report_due = if first {
            now >= last_report
        } else {
            now >= last_report + interval
        };
        // A power trip stays in the meter until the session takes it (within its 1 s tick) and
        // saves the state; the limiter's state is saved with every report, as the register.
        let (state, alert) = change_and_save(|m| {
            m.measure(current_ma, dt_ms);
            if report_due {
                m.report(now.as_millis());
            }
            (
                ((m.relay(), m.state()), m.take_low_balance_alert()),
                report_due,
            )
        })
        .await;
        if report_due {
            last_report = now;
            first = false;
            REPORT_READY.signal(());
        }
        if alert {
            session::LOW_BALANCE.signal(());
        }
        let (relay_state, balance_state) = state;
        blink = !blink;
        set_outputs(&mut relay, &mut led, relay_state, balance_state, blink);
    }
}

/// Relay (active high) and LED (active low): steady with credit, blinking when low, dark when
/// off.
fn set_outputs(
    relay: &mut Output<'static>,
    led: &mut Output<'static>,
    relay_state: Relay,
    balance_state: BalanceState,
    blink: bool,
) {
    relay.set_level(match relay_state {
        Relay::On => Level::High,
        Relay::Off => Level::Low,
    });
    let lit = match balance_state {
        BalanceState::Credit => true,
        BalanceState::Low => blink,
        BalanceState::Exhausted | BalanceState::Unknown => false,
    };
    led.set_level(if lit { Level::Low } else { Level::High });
}

/// Keeps the WiFi station associated; backs off from 1 s to 60 s while the AP is missing.
#[embassy_executor::task]
async fn wifi(mut controller: WifiController<'static>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match controller.connect_async().await {
            Ok(info) => {
                println!("WiFi connected: {info:?}");
                backoff = Duration::from_secs(1);
                let _ = controller.wait_for_disconnect_async().await;
                println!("WiFi disconnected");
            }
            Err(e) => println!("WiFi connect failed: {e:?}; retry in {backoff:?}"),
        }
        Timer::after(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

#[embassy_executor::task]
async fn net(mut runner: Runner<'static, Interface>) {
    runner.run().await
}
