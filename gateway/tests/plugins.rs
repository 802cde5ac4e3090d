//! Dynamic plugins, for real: cdylibs built by this workspace, checked and loaded with dlopen
//! by the real gateway, their statuses flowing back into the outbox, their panics survived,
//! and every loader refusal.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const SINK: &str = "libumeme_testkit_sink.so";
const SOURCE: &str = "libumeme_testkit_source.so";
const BAD_ABI: &str = "libumeme_testkit_badabi.so";

/// Builds the test plugins once per test binary; returns the library named `name`.
fn built(name: &str) -> PathBuf {
    cargo_build(&[
        "-p",
        "umeme-testkit-sink",
        "-p",
        "umeme-testkit-source",
        "-p",
        "umeme-testkit-badabi",
    ]);
    target_debug().join(name)
}

fn sha256(path: &Path) -> String {
    sha256_hex(path)
}

/// A plugin folder as the package installs it, with the test plugins named in `libs`.
fn plugin_dir(root: &Path, libs: &[&str]) -> PathBuf {
    install_plugins(root, &libs.iter().map(|l| built(l)).collect::<Vec<_>>())
}

fn set_mode(dir: &Path, mode: &str) {
    std::fs::write(dir.join("mode"), mode).unwrap();
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn sink_gateway(scratch: &Path, extra_sink: &str) -> (Gateway, PathBuf) {
    let plugins = plugin_dir(scratch, &[SINK]);
    let work = scratch.join("sinkwork");
    std::fs::create_dir_all(&work).unwrap();
    let cfg = format!(
        "[[sink]]\nname = \"kit\"\nplugin = \"{SINK}\"\nsha256 = \"{}\"\nretry_max = \"1s\"\n{extra_sink}\n[sink.config]\ndir = {:?}\n",
        sha256(&plugins.join(SINK)),
        work.display().to_string()
    );
    let gw = Gateway::with_plugins(&plugins, &cfg);
    (gw, work)
}

fn outbox(gw: &Gateway) -> serde_json::Value {
    let (status, v) = gw.http("GET", "/api/outbox", None);
    assert_eq!(status, 200);
    v["sinks"][0].clone()
}

#[test]
fn a_sink_plugin_receives_events_and_its_answers_drive_the_outbox() {
    let scratch = tempfile::tempdir().unwrap();
    let (mut gw, work) = sink_gateway(scratch.path(), "");
    gw.start();
    gw.add_meter("METER001", "plugin-test-secret");
    let paid = gw.simulate("METER001", 100.0);
    let delivered = eventually("the payment event at the plugin", || {
        let l = lines(&work.join("delivered.jsonl"));
        l.iter().any(|e| e["kind"] == "payment").then_some(l)
    });
    let payment = delivered.iter().find(|e| e["kind"] == "payment").unwrap();
    assert_eq!(payment["data"]["reference"], paid["reference"]);
    assert!(payment["id"].as_str().unwrap().starts_with("test-site-"));

    // Retryable: nothing counts, the backlog waits, failures are recorded.
    set_mode(&work, "retry");
    gw.simulate("METER001", 10.0);
    eventually("a recorded failure", || {
        (outbox(&gw)["failures_total"].as_i64().unwrap() >= 1).then_some(())
    });
    assert!(outbox(&gw)["backlog"].as_i64().unwrap() >= 1);
    assert_eq!(outbox(&gw)["last_error"], "testkit: down");

    // Some events refused for good: they go to the dead letters, the rest is delivered.
    set_mode(&work, "reject_odd");
    for _ in 0..3 {
        gw.simulate("METER001", 1.0);
    }
    eventually("the backlog to drain", || {
        (outbox(&gw)["backlog"] == 0).then_some(())
    });
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let dead: Vec<(i64, String)> = db
        .prepare("SELECT seq, reason FROM dead_letters WHERE sink = 'kit' ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        !dead.is_empty()
            && dead
                .iter()
                .all(|(seq, why)| seq % 2 == 1 && why == "testkit: odd seq"),
        "{dead:?}"
    );
    let at_sink: Vec<i64> = lines(&work.join("delivered.jsonl"))
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    for (seq, _) in &dead {
        assert!(!at_sink.contains(seq));
    }
    let stored: i64 = db
        .query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        at_sink.len() + dead.len(),
        stored as usize,
        "every event delivered or dead-lettered"
    );
    gw.assert_log("testkit sink created");
}

#[test]
fn a_plugin_panicking_in_create_or_deliver_is_recreated_and_the_batch_retried_while_the_gateway_serves(
) {
    let scratch = tempfile::tempdir().unwrap();
    let (mut gw, work) = sink_gateway(scratch.path(), "");
    set_mode(&work, "panic_create");
    gw.start();
    gw.add_meter("METER001", "plugin-test-secret");
    gw.simulate("METER001", 100.0);
    eventually("the panic in create to be logged", || {
        gw.log_text()
            .contains("testkit: panic in create")
            .then_some(())
    });
    set_mode(&work, "panic_deliver");
    eventually("the panic in deliver to be logged", || {
        gw.log_text()
            .contains("testkit: panic in deliver")
            .then_some(())
    });
    // The gateway serves meters and payments all along.
    let mut m = gw.connect("METER001", "plugin-test-secret");
    m.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 1, 10),
        1,
    );
    assert_eq!(gw.simulate("METER001", 10.0)["balance"], 5.5);
    assert!(
        outbox(&gw)["backlog"].as_i64().unwrap() >= 1,
        "nothing was delivered by a panicking plugin"
    );
    set_mode(&work, "ok");
    eventually("the backlog to drain after the plugin recovers", || {
        (outbox(&gw)["backlog"] == 0).then_some(())
    });
    let creates = std::fs::read_to_string(work.join("creates"))
        .unwrap()
        .lines()
        .count();
    assert!(
        creates >= 2,
        "the instance was recreated after the panic ({creates} creates)"
    );
    let at_sink = lines(&work.join("delivered.jsonl"));
    assert!(at_sink.iter().any(|e| e["kind"] == "payment"));
}

#[test]
fn a_payment_source_plugin_credits_once_per_reference_and_keeps_its_store_across_restarts() {
    let scratch = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(scratch.path(), &[SOURCE]);
    let work = scratch.path().join("srcwork");
    std::fs::create_dir_all(&work).unwrap();
    let cfg = format!(
        r#"[[source]]
name = "kit"
plugin = "{SOURCE}"
[source.config]
dir = {dir:?}
check_meters = ["METER001", "METER404"]
payments = [
  {{ meter = "METER001", amount_cents = 10000, reference = "QK1234" }},
  {{ meter = "METER001", amount_cents = 10000, reference = "QK1234" }},
  {{ meter = "METER404", amount_cents = 500, reference = "QK9999" }},
]
"#,
        dir = work.display().to_string()
    );
    let mut gw = Gateway::with_plugins(&plugins, &cfg);
    gw.add_meter("METER001", "plugin-test-secret");
    gw.start();
    let results: serde_json::Value = eventually("the source's results", || {
        std::fs::read_to_string(work.join("results.json"))
            .ok()
            .map(|t| serde_json::from_str(&t).unwrap())
    });
    let p = &results["payments"];
    assert_eq!(p[0]["ok"]["duplicate"], false);
    assert_eq!(p[0]["ok"]["balance_wh"], 5000);
    assert_eq!(
        p[1]["ok"]["duplicate"], true,
        "the same reference credits once: {p}"
    );
    assert!(
        p[2]["err"]
            .as_str()
            .unwrap()
            .contains("unknown meter METER404"),
        "{p}"
    );
    assert_eq!(results["accounts"], serde_json::json!([true, false]));
    assert_eq!(results["kv_before"], serde_json::Value::Null);
    assert_eq!(results["kv_after"], "ws_CO_123");
    assert_eq!(gw.balance_wh("METER001"), 5000);
    let (_, pays) = gw.http("GET", "/api/meters/METER001/payments", None);
    assert_eq!(pays["payments"][0]["source"], "kit");

    // After a restart the plugin's store still holds its key, and nothing is credited twice.
    std::fs::remove_file(work.join("results.json")).unwrap();
    gw.kill();
    gw.start();
    let results: serde_json::Value = eventually("the source's results after a restart", || {
        std::fs::read_to_string(work.join("results.json"))
            .ok()
            .map(|t| serde_json::from_str(&t).unwrap())
    });
    assert_eq!(results["kv_before"], "ws_CO_123");
    assert_eq!(results["payments"][0]["ok"]["duplicate"], true);
    assert_eq!(gw.balance_wh("METER001"), 5000);
}

#[test]
fn a_source_that_panics_when_starting_is_retried_and_the_gateway_serves_on() {
    let scratch = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(scratch.path(), &[SOURCE]);
    let cfg = format!(
        "[[source]]\nname = \"kit\"\nplugin = \"{SOURCE}\"\n[source.config]\ndir = \"/nonexistent\"\npayments = []\npanic = \"start\"\n"
    );
    let mut gw = Gateway::with_plugins(&plugins, &cfg);
    gw.start();
    eventually("two failed starts", || {
        (gw.metric(r#"umeme_source_failures_total{source="kit"}"#) >= 2.0).then_some(())
    });
    gw.assert_log("testkit: panic in start");
    gw.add_meter("METER001", "plugin-test-secret");
    assert_eq!(gw.simulate("METER001", 100.0)["balance"], 5.0);
    assert!(gw.is_running());
}

/// `check-config` on a config naming `lib` in `slot` (`sink` or `source`), in `plugins`.
fn check(plugins: &Path, slot: &str, lib: &str, sha256: Option<&str>) -> (i32, String) {
    let sha = sha256
        .map(|s| format!("sha256 = \"{s}\"\n"))
        .unwrap_or_default();
    check_config(
        plugins,
        &format!("[[{slot}]]\nname = \"x\"\nplugin = \"{lib}\"\n{sha}"),
    )
}

/// `check-config` on `plugin_dir = plugins` followed by `entries`: exit code and stderr.
fn check_config(plugins: &Path, entries: &str) -> (i32, String) {
    let dir = plugins
        .parent()
        .unwrap()
        .join(format!("cfg-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nplugin_dir = {:?}\n\n{entries}",
            plugins.display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `plugin inspect path`: exit code, stdout and stderr.
fn inspect(path: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["plugin", "inspect"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Builds `lib{name}.so` from C with `cc -shared` into `dir` (mode 0644): a constructor that
/// creates `marker` when the library is loaded, and, when `declare` is set, an exported
/// `umeme_plugin_declare` (returning NULL).
fn c_library(dir: &Path, name: &str, marker: &Path, declare: bool) -> PathBuf {
    let cc = require_tool("cc");
    let src = dir.join(format!("{name}.c"));
    let declaration = if declare {
        "void *umeme_plugin_declare(void) { return 0; }\n"
    } else {
        "int not_a_plugin(void) { return 1; }\n"
    };
    std::fs::write(
        &src,
        format!(
            "#include <stdio.h>\n\
             __attribute__((constructor)) static void ran(void) {{\n\
               FILE *f = fopen({marker:?}, \"w\"); if (f) fclose(f);\n\
             }}\n{declaration}",
            marker = marker.display().to_string()
        ),
    )
    .unwrap();
    let lib = dir.join(format!("lib{name}.so"));
    let out = Command::new(cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o644)).unwrap();
    lib
}

/// A copy of `lib` in `dir` whose ELF header says it is for another machine (e_machine).
fn for_another_machine(lib: &Path, dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(lib).unwrap();
    let other: u16 = if cfg!(target_arch = "aarch64") {
        62 // EM_X86_64
    } else {
        183 // EM_AARCH64
    };
    bytes[18..20].copy_from_slice(&other.to_le_bytes());
    let to = dir.join("libforeign.so");
    std::fs::write(&to, bytes).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
    to
}

#[test]
fn a_library_without_the_declaration_is_refused_before_dlopen_could_run_its_constructor() {
    let scratch = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(scratch.path(), &[]);
    let marker = scratch.path().join("constructor-ran");

    c_library(&plugins, "sneaky", &marker, false);
    let (code, err) = check(&plugins, "sink", "libsneaky.so", None);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("does not export umeme_plugin_declare"),
        "{err}"
    );
    assert!(err.contains("gateway.toml:"), "{err}");
    let (code, _, err) = inspect(&plugins.join("libsneaky.so"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("does not export umeme_plugin_declare"),
        "{err}"
    );
    assert!(
        !marker.exists(),
        "the library's constructor ran: it was dlopened"
    );

    // The marker is a fair witness: a library that does declare the symbol is loaded, its
    // constructor runs, and only then is its (null) declaration refused.
    c_library(&plugins, "declares", &marker, true);
    let (code, err) = check(&plugins, "sink", "libdeclares.so", None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("declaration is null"), "{err}");
    assert!(marker.exists(), "dlopen runs constructors");
}

#[test]
fn a_plugin_built_for_another_machine_is_refused_by_its_elf_header() {
    let scratch = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(scratch.path(), &[]);
    let foreign = for_another_machine(&built(SINK), &plugins);
    let (code, err) = check(&plugins, "sink", "libforeign.so", None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("but this gateway runs on"), "{err}");
    assert!(!err.contains("dlopen"), "refused before dlopen: {err}");
    let (code, _, err) = inspect(&foreign);
    assert_eq!(code, 1);
    assert!(err.contains("but this gateway runs on"), "{err}");
}

#[test]
fn check_config_refuses_a_plugin_secret_file_other_users_can_read_at_its_key() {
    let scratch = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(scratch.path(), &[SINK]);
    let password = scratch.path().join("uplink-password");
    std::fs::write(&password, "hunter2\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let entries = format!(
        "[[sink]]\nname = \"x\"\nplugin = \"{SINK}\"\n[sink.config]\ndir = \"/tmp\"\npassword_file = {:?}\n",
        password.display().to_string()
    );
    let (code, err) = check_config(&plugins, &entries);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("gateway.toml:9:1"),
        "located at the key: {err}"
    );
    assert!(
        err.contains("password_file: secret file") && err.contains(password.to_str().unwrap()),
        "{err}"
    );
    assert!(
        err.contains("mode 644") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "the secret is never shown: {err}");

    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, err) = check_config(&plugins, &entries);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn plugin_inspect_refuses_what_the_loader_refuses_symlinks_and_writable_files() {
    let scratch = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(scratch.path(), &[SINK]);
    let lib = plugins.join(SINK);
    let (code, out, err) = inspect(&lib);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("name:            testkit-sink"), "{out}");

    let link = plugins.join("liblink.so");
    std::os::unix::fs::symlink(&lib, &link).unwrap();
    let (code, _, err) = inspect(&link);
    assert_eq!(code, 1);
    assert!(
        err.contains("is a symbolic link; plugins are loaded only from real files"),
        "{err}"
    );

    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o664)).unwrap();
    let (code, _, err) = inspect(&lib);
    assert_eq!(code, 1);
    assert!(
        err.contains("the plugin file is writable by group or others"),
        "{err}"
    );
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn the_loader_refuses_unsafe_files_wrong_hashes_wrong_abi_and_wrong_kinds_with_clear_errors() {
    let scratch = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(scratch.path(), &[SINK, SOURCE, BAD_ABI]);
    let good = sha256(&plugins.join(SINK));
    assert_eq!(check(&plugins, "sink", SINK, Some(&good)).0, 0);
    assert_eq!(check(&plugins, "source", SOURCE, None).0, 0);

    let cases: Vec<(&str, &str, Option<String>, &str)> = vec![
        ("sink", SINK, Some("0".repeat(64)), "sha256 is"),
        (
            "source",
            SINK,
            None,
            "is a sink, configured as a payment source",
        ),
        (
            "sink",
            SOURCE,
            None,
            "is a payment source, configured as a sink",
        ),
        ("sink", BAD_ABI, None, "plugin ABI 99 is not supported"),
        ("sink", "libmissing.so", None, "No such file"),
        (
            "sink",
            "../libumeme_testkit_sink.so",
            None,
            "bare file name",
        ),
    ];
    for (slot, lib, sha, want) in &cases {
        let (code, err) = check(&plugins, slot, lib, sha.as_deref());
        assert_eq!(code, 2, "{slot} {lib}: {err}");
        assert!(
            err.contains(want),
            "{slot} {lib}: expected {want:?} in: {err}"
        );
        assert!(
            err.contains("gateway.toml:"),
            "the error names the config file and line: {err}"
        );
    }

    // A library without the declaration symbol.
    let libgcc = String::from_utf8(
        Command::new("gcc")
            .arg("-print-file-name=libgcc_s.so.1")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    std::fs::copy(libgcc.trim(), plugins.join("libnotaplugin.so")).unwrap();
    std::fs::set_permissions(
        plugins.join("libnotaplugin.so"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (code, err) = check(&plugins, "sink", "libnotaplugin.so", None);
    assert_eq!(code, 2);
    assert!(
        err.contains("does not export umeme_plugin_declare"),
        "{err}"
    );

    // A symlink, even to a good plugin.
    std::os::unix::fs::symlink(plugins.join(SINK), plugins.join("liblink.so")).unwrap();
    let (code, err) = check(&plugins, "sink", "liblink.so", None);
    assert_eq!(code, 2);
    assert!(err.contains("symbolic link"), "{err}");

    // A group-writable file, then a world-writable folder.
    std::fs::set_permissions(plugins.join(SINK), std::fs::Permissions::from_mode(0o664)).unwrap();
    let (code, err) = check(&plugins, "sink", SINK, None);
    assert_eq!(code, 2);
    assert!(
        err.contains("the plugin file is writable by group or others"),
        "{err}"
    );
    std::fs::set_permissions(plugins.join(SINK), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, err) = check(&plugins, "sink", SINK, None);
    assert_eq!(code, 2);
    assert!(
        err.contains("the plugin directory is writable by group or others"),
        "{err}"
    );
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o755)).unwrap();

    // `run` refuses the same way before it serves anything.
    let dir = scratch.path().join("runcfg");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nplugin_dir = {:?}\ndata_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:0\"\n[api]\nlisten = \"127.0.0.1:0\"\n[[sink]]\nname = \"x\"\nplugin = \"{BAD_ABI}\"\n",
            plugins.display().to_string(),
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("plugin ABI 99"));
}

#[test]
fn plugin_inspect_shows_versions_and_glibc_and_a_plugin_exports_one_symbol() {
    let lib = built(SINK);
    let out = Command::new(BIN)
        .args(["plugin", "inspect"])
        .arg(&lib)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "name:            testkit-sink",
        "kind:            sink",
        "abi:             1.2",
        "built with:      rustc ",
        "glibc required:  GLIBC_2.",
    ] {
        assert!(text.contains(want), "{want:?} in:\n{text}");
    }
    let nm = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
        .expect("nm (binutils) is installed");
    let symbols: Vec<String> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .map(|l| l.split_whitespace().last().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        symbols,
        ["umeme_plugin_declare"],
        "a plugin exports only its declaration"
    );
}

/// Debian's rustc-web 1.96, next to rustup's toolchain: the C ABI makes the versions irrelevant.
#[test]
fn a_plugin_built_by_another_rustc_loads_and_delivers() {
    let (cargo, rustc) = (Path::new("/usr/bin/cargo"), Path::new("/usr/bin/rustc"));
    assert!(
        cargo.exists() && rustc.exists(),
        "Debian's rustc-web is not installed; run scripts/test-all"
    );
    let host_rustc = String::from_utf8(
        Command::new("rustc")
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let other = String::from_utf8(
        Command::new(rustc)
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_ne!(
        host_rustc.split(' ').nth(1),
        other.split(' ').nth(1),
        "the two compilers must differ"
    );
    let target = target_debug().parent().unwrap().join("other-rustc");
    let st = Command::new(cargo)
        .current_dir(workspace())
        .env("RUSTC", rustc)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .args([
            "build",
            "-q",
            "--offline",
            "-p",
            "umeme-testkit-sink",
            "--target-dir",
        ])
        .arg(&target)
        .status()
        .unwrap();
    assert!(st.success(), "building the plugin with {other}");
    let lib = target.join("debug").join(SINK);
    let out = Command::new(BIN)
        .args(["plugin", "inspect"])
        .arg(&lib)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(other.trim().split(" (").next().unwrap()),
        "built with {other}: {text}"
    );

    // Load it into the gateway and deliver through it.
    let scratch = tempfile::tempdir().unwrap();
    let (mut gw, work) = sink_gateway(scratch.path(), "");
    let plugins = scratch.path().join("plugins");
    std::fs::copy(&lib, plugins.join(SINK)).unwrap();
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let old_sha = text
        .lines()
        .find(|l| l.starts_with("sha256"))
        .unwrap()
        .to_string();
    std::fs::write(
        &gw.config,
        text.replace(
            &old_sha,
            &format!("sha256 = \"{}\"", sha256(&plugins.join(SINK))),
        ),
    )
    .unwrap();
    gw.start();
    gw.add_meter("METER001", "plugin-test-secret");
    gw.simulate("METER001", 100.0);
    eventually("delivery through the other compiler's plugin", || {
        lines(&work.join("delivered.jsonl"))
            .iter()
            .any(|e| e["kind"] == "payment")
            .then_some(())
    });
    // The load line names the plugin's compiler.
    gw.assert_log(other.trim().split(" (").next().unwrap());
}
