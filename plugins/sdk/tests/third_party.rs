//! The example sink as a third party has it: copied out of the repository into a folder of its
//! own, depending on the SDK by path, its tests run in the harness, built in release, and the
//! `.so` exports the one declaration symbol and nothing else.
//!
//! Builds go to `<workspace>/target/third-party`, so a second run reuses the compiled
//! dependencies; the workspace's `Cargo.lock` is copied along so the versions (and the
//! compiled crates) are the ones the workspace already has, without going to the network.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Per cargo run; a first run on two busy cores compiles serde and friends twice (debug, release).
const CARGO_TIME_LIMIT: Duration = Duration::from_secs(15 * 60);

#[test]
fn the_example_sink_copied_out_of_the_repository_builds_tests_and_exports_one_symbol() {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = sdk
        .parent()
        .and_then(Path::parent)
        .expect("plugins/sdk is two levels down");
    let example = workspace.join("plugins/example-sink");
    let target_dir = workspace.join("target/third-party");

    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir =
        std::env::temp_dir().join(format!("umeme-third-party-{}-{nanos}", std::process::id()));
    assert!(
        !dir.starts_with(workspace),
        "{} is inside the repository",
        dir.display()
    );
    copy_dir(&example, &dir);
    fs::copy(workspace.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let manifest = fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    fs::write(dir.join("Cargo.toml"), third_party_manifest(&manifest, sdk)).unwrap();

    cargo(&dir, &target_dir, &["test", "--offline"]);
    cargo(&dir, &target_dir, &["build", "--release", "--offline"]);

    let so = target_dir.join("release/libumeme_example_sink.so");
    assert_eq!(
        exported_symbols(&so),
        ["umeme_plugin_declare"],
        "{} exports more than the declaration",
        so.display()
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// The example's manifest after the one-line rewrite its README tells a third party to make
/// (`path = "../sdk"` → the SDK's absolute path), with a `[workspace]` of its own.
fn third_party_manifest(manifest: &str, sdk: &Path) -> String {
    const FROM: &str = r#"path = "../sdk""#;
    let readme = fs::read_to_string(sdk.join("../example-sink/README.md")).unwrap();
    let sed = r#"sed -i 's|path = "../sdk"|path = "'"$UMEME"'/plugins/sdk"|' Cargo.toml"#;
    assert!(
        readme.contains(sed),
        "the example's README no longer shows the rewrite this test applies"
    );
    assert_eq!(
        manifest.matches(FROM).count(),
        1,
        "one SDK path in:\n{manifest}"
    );
    let to = format!("path = {:?}", sdk.to_str().unwrap());
    format!("{}\n[workspace]\n", manifest.replace(FROM, &to))
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() != "target" {
                copy_dir(&path, &to.join(entry.file_name()));
            }
        } else {
            fs::copy(&path, to.join(entry.file_name())).unwrap();
        }
    }
}

/// Runs `cargo ARGS` in `dir`, killed after [`CARGO_TIME_LIMIT`]; panics with its output on failure.
fn cargo(dir: &Path, target_dir: &Path, args: &[&str]) {
    let log = dir.join(format!("cargo-{}.log", args[0]));
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target_dir)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .expect("run cargo");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > CARGO_TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "cargo {} in {} took over {CARGO_TIME_LIMIT:?}",
                args.join(" "),
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "cargo {} took {:.1}s",
        args.join(" "),
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        let out = fs::read_to_string(&log).unwrap_or_default();
        let err = fs::read_to_string(log.with_extension("err")).unwrap_or_default();
        panic!(
            "cargo {} failed in {} ({status}):\n{out}\n{err}",
            args.join(" "),
            dir.display()
        );
    }
}

/// The dynamic symbols `so` defines, by `nm -D --defined-only`.
fn exported_symbols(so: &Path) -> Vec<String> {
    let output = match Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(so)
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            panic!("cannot run nm ({e}): install binutils to check the plugin's exported symbols")
        }
    };
    assert!(
        output.status.success(),
        "nm failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().last().map(str::to_string))
        .collect()
}
