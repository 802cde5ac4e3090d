//! README.md says this folder can be copied out and built on its own after rewriting one line.
//! This test does exactly that: copies the crate to a temporary folder outside the workspace,
//! applies the README's rewrite, and builds it with `cargo build --offline` (the dependencies
//! are in cargo's cache from the workspace build). Bounded: the build is killed after 10 min.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BUILD_LIMIT: Duration = Duration::from_secs(600);

/// The README's rewrite, as sed does it: `path = "../sdk"` → the checkout's SDK.
const FROM: &str = r#"path = "../sdk""#;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A folder under the system temp dir, removed at the end.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_example_copied_out_of_the_checkout_builds_after_the_readmes_one_line_rewrite() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let checkout = here.parent().and_then(Path::parent).unwrap();
    let readme = std::fs::read_to_string(here.join("README.md")).unwrap();
    let sed = r#"sed -i 's|path = "../sdk"|path = "'"$UMEME"'/plugins/sdk"|' Cargo.toml"#;
    assert!(
        readme.contains(sed),
        "README.md no longer shows the rewrite this test applies"
    );

    let tmp = TempDir(
        std::env::temp_dir().join(format!("umeme-example-copy-out-{}", std::process::id())),
    );
    let copy = tmp.0.join("site-webhook");
    copy_dir(&here.join("src"), &copy.join("src"));
    std::fs::copy(here.join("Cargo.toml"), copy.join("Cargo.toml")).unwrap();
    let manifest = std::fs::read_to_string(copy.join("Cargo.toml")).unwrap();
    assert_eq!(manifest.matches(FROM).count(), 1, "{manifest}");
    let to = format!(r#"path = "{}/plugins/sdk""#, checkout.display());
    std::fs::write(copy.join("Cargo.toml"), manifest.replace(FROM, &to)).unwrap();

    // Its own target folder inside the workspace's, kept between runs so only the first is slow.
    let target = checkout.join("target").join("copy-out");
    let mut child = Command::new(env!("CARGO"))
        .args(["build", "--offline", "--quiet"])
        .current_dir(&copy)
        .env("CARGO_TARGET_DIR", &target)
        .stdout(Stdio::null())
        // A file, not a pipe: a long error output must not block cargo while we wait.
        .stderr(std::fs::File::create(tmp.0.join("build.log")).unwrap())
        .spawn()
        .expect("run cargo");
    let deadline = Instant::now() + BUILD_LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the copied-out build took longer than {BUILD_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let err = std::fs::read_to_string(tmp.0.join("build.log")).unwrap_or_default();
    assert!(
        status.success(),
        "the copied-out example does not build:\n{err}"
    );
    assert!(target.join("debug/libumeme_example_sink.so").exists());
}
