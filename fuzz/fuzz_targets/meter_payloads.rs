//! Meter payloads (contract §4): v1 and v2 consumption reports, status and the meter's own
//! balance, as a meter on its own topic may send them. Any input is a value or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umeme_gateway::meter::MeterId;
use umeme_gateway::payload::{parse_meter_balance, Report, StatusReport};

fuzz_target!(|data: &[u8]| {
    let meter = MeterId::parse("METER001").expect("meter id");
    if let Ok(report) = Report::parse(data, &meter) {
        // What parsed must be something the ledger can hold.
        let _ = format!("{report:?}");
    }
    let _ = StatusReport::parse(data, &meter);
    let _ = parse_meter_balance(data, &meter);
});
