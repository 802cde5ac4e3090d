//! The test fake Realtime Database and token endpoint as a process, for the gateway's end-to-end
//! test (gateway/tests/firebase.rs). Test tooling only.
//!
//! `fake_rtdb --email E --public-key PUB.der --secret S [--seed JSON] [--index PATH:CHILD]…`
//! (`--index users:meter_no` is the `.indexOn` rule) prints
//! `listening http://127.0.0.1:PORT` and serves until its stdin closes. The tree can be read
//! with `GET /.json?auth=S`.

#[path = "../tests/fake_rtdb/mod.rs"]
mod fake_rtdb;

use std::io::{BufRead, Write};

fn main() {
    let mut state = fake_rtdb::State::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--email" => state.client_email = value,
            "--public-key" => state.public_key = Some(std::fs::read(&value).expect("public key")),
            "--secret" => state.secret = Some(value),
            "--seed" => state.tree = serde_json::from_str(&value).expect("seed is JSON"),
            "--index" => {
                let (path, child) = value.split_once(':').expect("--index PATH:CHILD");
                state.indexes.push((path.into(), child.into()));
            }
            other => panic!("unknown flag {other}"),
        }
    }
    let fake = fake_rtdb::FakeRtdb::start(state);
    let mut out = std::io::stdout();
    writeln!(out, "listening {}", fake.url()).unwrap();
    out.flush().unwrap();
    // Serve until the test closes our stdin (or exits).
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
}
