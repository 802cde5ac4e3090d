//! The plugin host: loads sink and payment-source plugins (`.so`, the C ABI of
//! `umeme_plugin_sdk::abi`), checks them before and after loading, and adapts them to the
//! outbox's [`crate::outbox::Sink`] and to the ledger.
//!
//! Loading, in order: the name must be a bare `*.so` file name; `plugin_dir` must be a real
//! directory owned by root (or the daemon's user) and not group/world-writable; the file is
//! opened with `O_NOFOLLOW` (no symlinks) and checked on that descriptor (a regular file, same
//! owners, not group/world-writable), hashed (SHA-256, compared when the config gives one), its
//! ELF headers checked ([`check_elf`]: this machine, and `umeme_plugin_declare` exported; before
//! `dlopen`, which runs constructors), and loaded from that same descriptor (`/proc/self/fd/N`,
//! `RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE`) so the code loaded is the code checked. Then the one
//! exported symbol is read and the declaration checked (magic, ABI major, sizes, kind).
//!
//! Architecture invariants: a plugin library is never unloaded; a plugin function is never
//! called on a tokio worker thread (sinks run on the outbox's threads, sources on their own);
//! a plugin that panics is destroyed and created again, with backoff, and a circuit breaker
//! stops recreating one that keeps panicking.

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{error, info, warn};
use umeme_plugin_sdk::abi::{self, Declaration, HostApi, Status, Str, Writer};

use crate::hub::{Hub, Outgoing};
use crate::meter::MeterId;
use crate::outbox::Delivery;
use crate::store::{self, Event};
use crate::untrusted::Untrusted;
use crate::writer::{Credit, LedgerError, Op, Outcome, Writer as LedgerWriter};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sink,
    Source,
}

impl Kind {
    fn code(self) -> u32 {
        match self {
            Kind::Sink => abi::KIND_SINK,
            Kind::Source => abi::KIND_SOURCE,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Sink => "sink",
            Kind::Source => "payment source",
        }
    }
}

/// The configuration line a load error belongs to: a file that does not match its `sha256`
/// points at the `sha256` line, everything else at the entry's `name`.
pub fn error_location<'a>(
    e: &PluginError,
    declared_at: &'a (PathBuf, usize, usize),
    sha256_at: Option<&'a (PathBuf, usize, usize)>,
) -> &'a (PathBuf, usize, usize) {
    match (e, sha256_at) {
        (PluginError::Sha256 { .. }, Some(at)) => at,
        _ => declared_at,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {0:?} must be a bare file name ending in .so, inside plugin_dir")]
    NotBareName(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: is a symbolic link; plugins are loaded only from real files")]
    Symlink(PathBuf),
    #[error("{0}: not a regular file")]
    NotAFile(PathBuf),
    #[error("{path}: {what} must be owned by root or by the gateway's user (owner uid {uid})")]
    Owner {
        path: PathBuf,
        what: &'static str,
        uid: u32,
    },
    #[error("{path}: {what} is writable by group or others (mode {mode:o}); chmod go-w it")]
    Writable {
        path: PathBuf,
        what: &'static str,
        mode: u32,
    },
    #[error("{path}: sha256 is {actual}, the configuration expects {expected}")]
    Sha256 {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: {source}")]
    Elf { path: PathBuf, source: ElfError },
    #[error("{path}: dlopen failed: {reason}")]
    Dlopen { path: PathBuf, reason: String },
    #[error("{path}: not an umeme plugin: {reason}")]
    NotAPlugin { path: PathBuf, reason: String },
    #[error("{path}: plugin ABI {found} is not supported by this gateway (ABI {ABI}.x)", ABI = abi::ABI_MAJOR)]
    AbiMajor { path: PathBuf, found: u16 },
    #[error("{path}: plugin {name:?} is a {found}, configured as a {wanted}")]
    WrongKind {
        path: PathBuf,
        name: String,
        found: &'static str,
        wanted: &'static str,
    },
}

/// A loaded plugin library: its declaration and what `plugin inspect` shows.
#[derive(Clone, serde::Serialize)]
pub struct Library {
    pub path: PathBuf,
    pub name: String,
    pub kind: &'static str,
    pub abi: String,
    pub plugin_version: String,
    pub sdk_version: String,
    pub rustc_version: String,
    pub sha256: String,
    /// The highest `GLIBC_2.x` symbol version the library needs.
    pub glibc_required: Option<String>,
    #[serde(skip)]
    decl: &'static Declaration,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PluginError + '_ {
    move |source| PluginError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn check_owner_and_mode(
    path: &Path,
    meta: &std::fs::Metadata,
    what: &'static str,
) -> Result<(), PluginError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(PluginError::Owner {
            path: path.to_path_buf(),
            what,
            uid: meta.uid(),
        });
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(PluginError::Writable {
            path: path.to_path_buf(),
            what,
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Opens a plugin file without following a symlink and checks it on that descriptor (a regular
/// file, owner, mode); returns the descriptor and the bytes read from it, which are what gets
/// hashed, ELF-checked and (through the same descriptor) loaded.
fn open_plugin_file(path: &Path) -> Result<(std::fs::File, Vec<u8>), PluginError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                PluginError::Symlink(path.to_path_buf())
            } else {
                PluginError::Io {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
    let meta = f.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(PluginError::NotAFile(path.to_path_buf()));
    }
    check_owner_and_mode(path, &meta, "the plugin file")?;
    let bytes = {
        use std::io::Read;
        let mut b = Vec::with_capacity(meta.len() as usize);
        (&f).read_to_end(&mut b).map_err(io(path))?;
        b
    };
    Ok((f, bytes))
}

/// Why a file's ELF headers say it cannot be a plugin for this gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF shared library: {0}")]
    NotElf(String),
    #[error("not a shared library (ELF type {0}); build the plugin as a cdylib")]
    NotShared(String),
    #[error(
        "built for {found}, but this gateway runs on {expected}; build the plugin for this \
         machine's target"
    )]
    WrongMachine { found: String, expected: String },
    #[error(
        "not an umeme plugin: it does not export {} as a defined global function",
        abi::DECLARE_SYMBOL
    )]
    NoDeclaration,
}

/// The ELF machine, class and byte order this gateway was built for (`None` for an
/// architecture the check does not know: then only class and byte order are compared).
fn host_elf() -> (Option<object::Architecture>, bool, object::Endianness) {
    use object::Architecture as A;
    let arch = if cfg!(target_arch = "x86_64") {
        Some(A::X86_64)
    } else if cfg!(target_arch = "aarch64") {
        Some(A::Aarch64)
    } else if cfg!(target_arch = "arm") {
        Some(A::Arm)
    } else if cfg!(target_arch = "x86") {
        Some(A::I386)
    } else if cfg!(target_arch = "riscv64") {
        Some(A::Riscv64)
    } else {
        None
    };
    let endian = if cfg!(target_endian = "little") {
        object::Endianness::Little
    } else {
        object::Endianness::Big
    };
    (arch, cfg!(target_pointer_width = "64"), endian)
}

fn describe_elf(arch: Option<object::Architecture>, is_64: bool, e: object::Endianness) -> String {
    let arch = arch.map_or_else(
        || "this machine".into(),
        |a| format!("{a:?}").to_lowercase(),
    );
    let bits = if is_64 { 64 } else { 32 };
    let endian = match e {
        object::Endianness::Little => "little-endian",
        object::Endianness::Big => "big-endian",
    };
    format!("{arch} ({bits}-bit {endian})")
}

/// Checks a plugin file's ELF headers before anything of it runs: a shared library for this
/// gateway's machine, class and byte order, whose dynamic symbol table exports
/// `umeme_plugin_declare` as a defined global function. `dlopen` runs a library's constructors
/// before the host can look for that symbol, so a file that fails here is never loaded.
///
/// A pure function over the file's bytes (fuzzed as "the plugin declaration reader"). It reads
/// the section headers' `.dynsym`, which a hand-crafted file could make disagree with what the
/// dynamic loader uses; it keeps wrong files out, and trust in the file still comes from its
/// owner, mode and sha256.
pub fn check_elf(bytes: &[u8]) -> Result<(), ElfError> {
    use object::{Object, ObjectKind, ObjectSymbol, SymbolKind};
    let file = object::File::parse(bytes).map_err(|e| ElfError::NotElf(e.to_string()))?;
    if file.format() != object::BinaryFormat::Elf {
        return Err(ElfError::NotElf(format!("{:?} file", file.format())));
    }
    let (arch, is_64, endian) = host_elf();
    let machine_ok = arch.is_none_or(|a| a == file.architecture())
        && file.is_64() == is_64
        && file.endianness() == endian;
    if !machine_ok {
        return Err(ElfError::WrongMachine {
            found: describe_elf(Some(file.architecture()), file.is_64(), file.endianness()),
            expected: describe_elf(arch, is_64, endian),
        });
    }
    if file.kind() != ObjectKind::Dynamic {
        return Err(ElfError::NotShared(
            format!("{:?}", file.kind()).to_lowercase(),
        ));
    }
    let declared = file.dynamic_symbols().any(|s| {
        s.name_bytes() == Ok(abi::DECLARE_SYMBOL.as_bytes())
            && s.is_definition()
            && s.is_global()
            && s.kind() == SymbolKind::Text
    });
    if !declared {
        return Err(ElfError::NoDeclaration);
    }
    Ok(())
}

/// The highest `GLIBC_2.N[.M]` version named in the file (its symbol version needs).
pub fn glibc_required(bytes: &[u8]) -> Option<String> {
    let needle = b"GLIBC_2.";
    let mut best: Option<(Vec<u32>, String)> = None;
    let mut i = 0;
    while let Some(pos) = bytes[i..].windows(needle.len()).position(|w| w == needle) {
        let start = i + pos;
        let mut end = start + needle.len();
        while end < bytes.len() && (bytes[end].is_ascii_digit() || bytes[end] == b'.') {
            end += 1;
        }
        let text = String::from_utf8_lossy(&bytes[start..end])
            .trim_end_matches('.')
            .to_string();
        let parts: Vec<u32> = text["GLIBC_".len()..]
            .split('.')
            .filter_map(|p| p.parse().ok())
            .collect();
        if parts.len() >= 2 && best.as_ref().is_none_or(|(b, _)| parts > *b) {
            best = Some((parts, text));
        }
        i = end;
    }
    best.map(|b| b.1)
}

/// Libraries loaded so far, by SHA-256: the same file for two `[[sink]]`s loads once.
fn loaded() -> &'static Mutex<HashMap<String, Library>> {
    static LOADED: OnceLock<Mutex<HashMap<String, Library>>> = OnceLock::new();
    LOADED.get_or_init(Default::default)
}

/// Loads `file` from `dir` after every check, or returns the already loaded library.
pub fn load(
    dir: &Path,
    file: &str,
    sha256: Option<&str>,
    kind: Kind,
) -> Result<Library, PluginError> {
    let bare = !file.is_empty() && !file.contains('/') && file != ".." && file.ends_with(".so");
    if !bare {
        return Err(PluginError::NotBareName(file.to_string()));
    }
    let dir_meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if !dir_meta.is_dir() {
        return Err(PluginError::NotAFile(dir.to_path_buf()));
    }
    check_owner_and_mode(dir, &dir_meta, "the plugin directory")?;
    let path = dir.join(file);
    let (f, bytes) = open_plugin_file(&path)?;
    let actual: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if let Some(expected) = sha256 {
        if !expected.eq_ignore_ascii_case(&actual) {
            return Err(PluginError::Sha256 {
                path,
                expected: expected.to_string(),
                actual,
            });
        }
    }
    let mut registry = loaded().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(lib) = registry.get(&actual) {
        check_kind(lib, kind)?;
        return Ok(lib.clone());
    }
    let lib = open_checked(&path, f, bytes, actual.clone())?;
    check_kind(&lib, kind)?;
    registry.insert(actual, lib.clone());
    Ok(lib)
}

fn check_kind(lib: &Library, kind: Kind) -> Result<(), PluginError> {
    if lib.decl.kind != kind.code() {
        return Err(PluginError::WrongKind {
            path: lib.path.clone(),
            name: lib.name.clone(),
            found: lib.kind,
            wanted: kind.as_str(),
        });
    }
    Ok(())
}

fn open_checked(
    path: &Path,
    f: std::fs::File,
    bytes: Vec<u8>,
    sha256: String,
) -> Result<Library, PluginError> {
    use std::os::fd::AsRawFd;
    let not_plugin = |reason: String| PluginError::NotAPlugin {
        path: path.to_path_buf(),
        reason,
    };
    check_elf(&bytes).map_err(|source| PluginError::Elf {
        path: path.to_path_buf(),
        source,
    })?;
    let via_fd = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
    let flags = libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE;
    // SAFETY: loading runs the library's initialisers; the file passed every check above, and
    // the descriptor it is loaded from is the one that was checked.
    let library =
        unsafe { libloading::os::unix::Library::open(Some(&via_fd), flags) }.map_err(|e| {
            PluginError::Dlopen {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
    // The descriptor stays open for the process's life: glibc tells loaded objects apart by
    // name, and a reused `/proc/self/fd/N` would alias another plugin.
    std::mem::forget(f);
    // SAFETY: the symbol's type is fixed by the ABI; a library without it is refused.
    let declare: abi::DeclareFn = unsafe {
        *library
            .get::<abi::DeclareFn>(abi::DECLARE_SYMBOL.as_bytes())
            .map_err(|_| not_plugin(format!("it does not export {}", abi::DECLARE_SYMBOL)))?
    };
    // Never unloaded (Rust thread-local destructors would jump into unmapped code).
    std::mem::forget(library);
    // SAFETY: calling the declaration function is side-effect free by the ABI.
    let decl = unsafe { declare() };
    // SAFETY: a non-null declaration points to a static in the library, which stays loaded.
    let Some(decl) = (unsafe { decl.as_ref() }) else {
        return Err(not_plugin("its declaration is null".into()));
    };
    if decl.magic != abi::MAGIC {
        return Err(not_plugin("wrong magic number".into()));
    }
    if decl.abi_major != abi::ABI_MAJOR {
        return Err(PluginError::AbiMajor {
            path: path.to_path_buf(),
            found: decl.abi_major,
        });
    }
    if (decl.struct_size as usize) < std::mem::size_of::<Declaration>() {
        return Err(not_plugin(format!(
            "declaration of {} bytes is too short",
            decl.struct_size
        )));
    }
    let vtable_ok = match decl.kind {
        // SAFETY: non-null vtables point to statics in the library.
        abi::KIND_SINK => unsafe { decl.sink.as_ref() }
            .is_some_and(|v| v.struct_size as usize >= std::mem::size_of::<abi::SinkVTable>()),
        abi::KIND_SOURCE => unsafe { decl.source.as_ref() }
            .is_some_and(|v| v.struct_size as usize >= std::mem::size_of::<abi::SourceVTable>()),
        other => return Err(not_plugin(format!("unknown plugin kind {other}"))),
    };
    if !vtable_ok {
        return Err(not_plugin(
            "its function table is missing or too short".into(),
        ));
    }
    let text = |p: *const std::ffi::c_char| -> String {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: the ABI's strings are NUL-terminated statics in the library.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let lib = Library {
        path: path.to_path_buf(),
        name: text(decl.name),
        kind: if decl.kind == abi::KIND_SINK {
            "sink"
        } else {
            "payment source"
        },
        abi: format!("{}.{}", decl.abi_major, decl.abi_minor),
        plugin_version: text(decl.plugin_version),
        sdk_version: text(decl.sdk_version),
        rustc_version: text(decl.rustc_version),
        sha256,
        glibc_required: glibc_required(&bytes),
        decl,
    };
    info!(plugin = %lib.name, kind = lib.kind, version = %lib.plugin_version, sdk = %lib.sdk_version,
          rustc = %lib.rustc_version, sha256 = %lib.sha256, path = %path.display(), "plugin loaded");
    Ok(lib)
}

/// Loads a library for `plugin inspect`: the file checks of [`load`] (no symlink, a regular
/// file, owner, mode, ELF) on the file itself; its folder is not checked (a build folder need
/// not be root's), and there is no sha256 to compare.
pub fn inspect(path: &Path) -> Result<Library, PluginError> {
    let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
    if !file.ends_with(".so") {
        return Err(PluginError::NotBareName(file.to_string()));
    }
    let (f, bytes) = open_plugin_file(path)?;
    let sha: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    open_checked(path, f, bytes, sha)
}

// ---- the host side of the ABI ----

/// What a plugin instance may reach in the gateway.
pub struct HostServices {
    pub plugin: String,
    pub kind: Kind,
    pub writer: LedgerWriter,
    pub db_path: PathBuf,
    pub hub: Arc<Hub>,
    /// The tariffs, for the minimum top-up at validation (`validate_payment`).
    pricing: crate::config::Tariff,
    reader: Mutex<Option<rusqlite::Connection>>,
}

impl HostServices {
    pub fn new(
        plugin: String,
        kind: Kind,
        writer: LedgerWriter,
        db_path: PathBuf,
        hub: Arc<Hub>,
        pricing: crate::config::Tariff,
    ) -> Arc<Self> {
        Arc::new(HostServices {
            plugin,
            kind,
            writer,
            db_path,
            hub,
            pricing,
            reader: Mutex::new(None),
        })
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> Result<T, store::StoreError>,
    ) -> Result<T, String> {
        let mut guard = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(store::open_read_only(&self.db_path).map_err(|e| e.to_string())?);
        }
        f(guard.as_ref().expect("opened above")).map_err(|e| e.to_string())
    }

    /// Ledger writes from a plugin's thread. A host async worker must never block here (the
    /// plugin would have been called on one, which the host never does): refuse instead.
    fn submit(&self, op: Op) -> Result<Outcome, (Status, String)> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err((
                abi::BUSY,
                "called on the gateway's async runtime; call from a plugin thread".into(),
            ));
        }
        self.writer.submit_blocking(op).map_err(|e| match e {
            LedgerError::UnknownMeter(m) => (abi::REJECTED, format!("unknown meter {m}")),
            // A documented answer (plugins/sdk README): `reference_conflict: …`, nothing of
            // the first payment.
            LedgerError::ReferenceConflict => (abi::REJECTED, format!("{}: {e}", e.reason())),
            LedgerError::BadReference | LedgerError::Full(_) => (abi::REJECTED, e.to_string()),
            other => (abi::BUSY, other.to_string()),
        })
    }

    fn submit_payment(&self, json: &[u8]) -> Result<String, (Status, String)> {
        let p: umeme_plugin_sdk::Payment = serde_json::from_slice(json)
            .map_err(|e| (abi::REJECTED, format!("payment JSON: {e}")))?;
        let meter = MeterId::parse(&p.meter).map_err(|e| (abi::REJECTED, e.to_string()))?;
        if p.amount_cents <= 0 || p.amount_cents > 100_000_000 {
            return Err((
                abi::REJECTED,
                format!("amount_cents {} is out of range", p.amount_cents),
            ));
        }
        // Only a plausible number travels on to the sinks; a masked or odd one is dropped.
        let phone = p.phone.filter(|ph| {
            let digits = ph.strip_prefix('+').unwrap_or(ph);
            (6..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
        });
        let credit = Credit {
            meter,
            source: self.plugin.clone(),
            reference: p.reference.clone(),
            amount_cents: p.amount_cents,
            at: store::now_ms(),
            phone,
        };
        match self.submit(Op::Credit(credit))? {
            Outcome::Credited { payment, duplicate } => {
                info!(plugin = %self.plugin, meter = %payment.meter, reference = %crate::untrusted::Untrusted(&payment.reference), duplicate, "payment credited");
                let r = umeme_plugin_sdk::PaymentResult {
                    duplicate,
                    credit_wh: payment.credit_wh,
                    balance_wh: payment.balance_after_wh,
                };
                Ok(serde_json::to_string(&r).unwrap_or_default())
            }
            // Kept as unapplied by the ledger; the source hears why (`below_minimum_topup: …`)
            // and may keep it too (the same source and reference: one row).
            Outcome::Unapplied { reason } => Err((abi::REJECTED, reason)),
            _ => Err((abi::BUSY, "unexpected ledger outcome".into())),
        }
    }

    fn validate_account(&self, meter: &[u8]) -> Result<String, (Status, String)> {
        let meter = std::str::from_utf8(meter)
            .ok()
            .and_then(|m| MeterId::parse(m).ok());
        let Some(meter) = meter else {
            return Err((abi::REJECTED, "not a meter number".into()));
        };
        match self.read(|c| store::meter(c, &meter)) {
            Ok(Some(_)) => Ok(String::new()),
            Ok(None) => Err((abi::REJECTED, format!("unknown meter {meter}"))),
            Err(e) => Err((abi::BUSY, e)),
        }
    }

    /// [`HostApi::validate_payment`]: the meter exists and the amount is at least its tariff's
    /// minimum top-up now (the ledger keeps a smaller payment that arrives anyway as unapplied).
    fn validate_payment(
        &self,
        meter: &[u8],
        amount_cents: i64,
    ) -> Result<String, (Status, String)> {
        let meter = std::str::from_utf8(meter)
            .ok()
            .and_then(|m| MeterId::parse(m).ok());
        let Some(meter) = meter else {
            return Err((abi::REJECTED, "unknown_meter: not a meter number".into()));
        };
        let row = match self.read(|c| store::meter(c, &meter)) {
            Ok(Some(row)) => row,
            Ok(None) => return Err((abi::REJECTED, format!("unknown_meter: {meter}"))),
            Err(e) => return Err((abi::BUSY, e)),
        };
        let tariff = self
            .pricing
            .in_force(row.tariff.as_deref(), store::now_ms());
        if !tariff.accepts_topup(amount_cents) {
            return Err((
                abi::REJECTED,
                format!(
                    "below_minimum_topup: the minimum top-up for meter {meter} is KES {}",
                    tariff.minimum_topup
                ),
            ));
        }
        Ok(String::new())
    }

    fn submit_command(&self, json: &[u8]) -> Result<String, (Status, String)> {
        let c: umeme_plugin_sdk::Command = serde_json::from_slice(json)
            .map_err(|e| (abi::REJECTED, format!("command JSON: {e}")))?;
        let meter = MeterId::parse(&c.meter).map_err(|e| (abi::REJECTED, e.to_string()))?;
        let leaf = match c.command.as_str() {
            "relay" => "relay",
            "config" => "config",
            other => {
                return Err((
                    abi::REJECTED,
                    format!("unknown command {other:?} (relay, config)"),
                ))
            }
        };
        if self
            .read(|conn| store::meter(conn, &meter))
            .map_err(|e| (abi::BUSY, e))?
            .is_none()
        {
            return Err((abi::REJECTED, format!("unknown meter {meter}")));
        }
        let payload = bytes::Bytes::from(c.payload.to_string());
        if self.hub.send(&meter, Outgoing::Command { leaf, payload }) {
            Ok(String::new())
        } else {
            Err((abi::BUSY, format!("meter {meter} is not connected")))
        }
    }

    fn kv_get(&self, key: &[u8]) -> Result<String, (Status, String)> {
        let key = String::from_utf8_lossy(key).into_owned();
        match self.read(|c| store::kv_get(c, &self.plugin, &key)) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err((abi::REJECTED, String::new())),
            Err(e) => Err((abi::BUSY, e)),
        }
    }

    fn kv_put(&self, key: &[u8], value: &[u8]) -> Result<String, (Status, String)> {
        let key = String::from_utf8_lossy(key).into_owned();
        if key.is_empty() || key.len() > 200 || value.len() > 64 * 1024 {
            return Err((
                abi::REJECTED,
                "keys are 1 to 200 bytes, values at most 64 KiB".into(),
            ));
        }
        let value = (!value.is_empty()).then(|| String::from_utf8_lossy(value).into_owned());
        self.submit(Op::KvPut {
            plugin: self.plugin.clone(),
            key,
            value,
        })?;
        Ok(String::new())
    }
}

/// The largest original body kept with an unapplied payment.
const UNAPPLIED_MAX_RAW_BYTES: usize = 8 * 1024;

impl HostServices {
    fn record_unapplied(&self, json: &[u8]) -> Result<String, (Status, String)> {
        let u: umeme_plugin_sdk::Unapplied = serde_json::from_slice(json)
            .map_err(|e| (abi::REJECTED, format!("unapplied payment JSON: {e}")))?;
        let reference_ok = !u.reference.is_empty()
            && u.reference.len() <= 100
            && !u.reference.chars().any(char::is_control);
        if !reference_ok || u.amount_cents <= 0 || u.amount_cents > 100_000_000 {
            return Err((
                abi::REJECTED,
                "an unapplied payment needs a reference of 1 to 100 printable characters and an amount of 1 to 100000000 cents".into(),
            ));
        }
        let short = |s: &str, n: usize| s.chars().take(n).collect::<String>();
        // A real Daraja body is under 1 KiB; a bigger one is kept without it, so the cap on
        // records also bounds their bytes.
        let raw = u
            .raw
            .as_ref()
            .map(|v| v.to_string())
            .filter(|r| r.len() <= UNAPPLIED_MAX_RAW_BYTES);
        let row = store::UnappliedRow {
            source: self.plugin.clone(),
            reference: u.reference.clone(),
            amount_cents: u.amount_cents,
            account: short(&u.account, 100),
            phone: u.phone.as_deref().map(|p| short(p, 100)),
            reason: short(&u.reason, 500),
            raw,
            received_at: store::now_ms(),
            applied_meter: None,
            applied_at: None,
        };
        // A refusal is counted by the writer (`umeme_ledger_errors_total{reason="store_full"}`).
        self.submit(Op::RecordUnapplied(row))
            .inspect_err(|(_, why)| {
                warn!(plugin = %self.plugin, reference = %Untrusted(&u.reference), "unapplied payment not kept: {}", Untrusted(why));
            })?;
        warn!(plugin = %self.plugin, reference = %Untrusted(&u.reference), amount_cents = u.amount_cents,
              account = %Untrusted(&u.account), "payment kept as unapplied: `umeme-gateway payment apply REF METER` credits it");
        Ok(String::new())
    }
}

unsafe extern "C" fn host_record_unapplied(
    ctx: *mut c_void,
    unapplied: Str,
    out: *mut Writer,
) -> Status {
    answer(out, || {
        unsafe { services(ctx) }.record_unapplied(unsafe { unapplied.as_bytes() })
    })
}

/// Runs a host callback: a panic in the host must not unwind into the plugin's frames.
fn answer(out: *mut Writer, f: impl FnOnce() -> Result<String, (Status, String)>) -> Status {
    let (status, text) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(text)) => (abi::OK, text),
        Ok(Err((s, text))) => (s, text),
        Err(_) => (abi::BUSY, "the gateway failed handling this call".into()),
    };
    // SAFETY: `out` is null or the plugin's writer, valid during the call.
    if let Some(w) = unsafe { out.as_mut() } {
        unsafe { (w.write)(w.ctx, Str::new(&text)) };
    }
    status
}

unsafe fn services<'a>(ctx: *mut c_void) -> &'a HostServices {
    // SAFETY: `ctx` is the `HostServices` the table was built with; it outlives the instance.
    unsafe { &*(ctx as *const HostServices) }
}

unsafe extern "C" fn host_log(ctx: *mut c_void, level: u32, target: Str, message: Str) {
    let _ = std::panic::catch_unwind(|| {
        let s = unsafe { services(ctx) };
        let target = String::from_utf8_lossy(unsafe { target.as_bytes() });
        let raw = unsafe { message.as_bytes() };
        let msg = String::from_utf8_lossy(&raw[..raw.len().min(8192)]);
        match level {
            abi::LEVEL_ERROR => error!(plugin = %s.plugin, target = %target, "{msg}"),
            abi::LEVEL_WARN => warn!(plugin = %s.plugin, target = %target, "{msg}"),
            abi::LEVEL_INFO => info!(plugin = %s.plugin, target = %target, "{msg}"),
            _ => tracing::debug!(plugin = %s.plugin, target = %target, "{msg}"),
        }
    });
}

unsafe extern "C" fn host_submit_payment(
    ctx: *mut c_void,
    payment: Str,
    out: *mut Writer,
) -> Status {
    answer(out, || {
        unsafe { services(ctx) }.submit_payment(unsafe { payment.as_bytes() })
    })
}

unsafe extern "C" fn host_validate_account(
    ctx: *mut c_void,
    meter: Str,
    out: *mut Writer,
) -> Status {
    answer(out, || {
        unsafe { services(ctx) }.validate_account(unsafe { meter.as_bytes() })
    })
}

unsafe extern "C" fn host_validate_payment(
    ctx: *mut c_void,
    meter: Str,
    amount_cents: i64,
    out: *mut Writer,
) -> Status {
    answer(out, || {
        unsafe { services(ctx) }.validate_payment(unsafe { meter.as_bytes() }, amount_cents)
    })
}

unsafe extern "C" fn host_submit_command(
    ctx: *mut c_void,
    command: Str,
    out: *mut Writer,
) -> Status {
    answer(out, || {
        unsafe { services(ctx) }.submit_command(unsafe { command.as_bytes() })
    })
}

unsafe extern "C" fn host_kv_get(ctx: *mut c_void, key: Str, out: *mut Writer) -> Status {
    answer(out, || {
        unsafe { services(ctx) }.kv_get(unsafe { key.as_bytes() })
    })
}

unsafe extern "C" fn host_kv_put(
    ctx: *mut c_void,
    key: Str,
    value: Str,
    out: *mut Writer,
) -> Status {
    answer(out, || {
        unsafe { services(ctx) }.kv_put(unsafe { key.as_bytes() }, unsafe { value.as_bytes() })
    })
}

/// The host table handed to an instance, with the services it points to.
///
/// Leaked on purpose, like the library: a plugin may keep the table's address in a global (the
/// SDK's logger does) and call it from its own threads after an instance is gone, so a table
/// lives as long as the process. One per configured sink or source.
struct Table {
    api: &'static HostApi,
}

impl Table {
    fn new(services: Arc<HostServices>) -> Table {
        let level = if tracing::enabled!(tracing::Level::DEBUG) {
            abi::LEVEL_DEBUG
        } else {
            abi::LEVEL_INFO
        };
        let leaked: &'static Arc<HostServices> = Box::leak(Box::new(services));
        let services: &'static HostServices = leaked;
        let api = Box::leak(Box::new(HostApi {
            struct_size: std::mem::size_of::<HostApi>() as u32,
            abi_major: abi::ABI_MAJOR,
            abi_minor: abi::ABI_MINOR,
            ctx: services as *const HostServices as *mut c_void,
            log: host_log,
            max_level: level,
            _reserved: 0,
            submit_payment: host_submit_payment,
            validate_account: host_validate_account,
            submit_command: host_submit_command,
            kv_get: host_kv_get,
            kv_put: host_kv_put,
            record_unapplied: host_record_unapplied,
            validate_payment: host_validate_payment,
        }));
        Table { api }
    }
}

unsafe extern "C" fn push(ctx: *mut c_void, bytes: Str) {
    let buf = unsafe { &mut *(ctx as *mut Vec<u8>) };
    let b = unsafe { bytes.as_bytes() };
    // Plugins cannot grow host memory without bound.
    let room = (1usize << 20).saturating_sub(buf.len());
    buf.extend_from_slice(&b[..b.len().min(room)]);
}

/// Calls into a plugin with a writer collecting what it writes.
fn call(f: impl FnOnce(*mut Writer) -> Status) -> (Status, String) {
    let mut buf: Vec<u8> = Vec::new();
    let mut w = Writer {
        ctx: &mut buf as *mut Vec<u8> as *mut c_void,
        write: push,
    };
    let status = f(&mut w);
    (status, String::from_utf8_lossy(&buf).into_owned())
}

/// Panics within this window count toward the circuit breaker.
const PANIC_WINDOW: Duration = Duration::from_secs(600);
/// This many panics within the window open the breaker.
const PANIC_LIMIT: usize = 5;
/// While the breaker is open, calls are refused for this long.
const BREAKER_OPEN: Duration = Duration::from_secs(600);

/// Panic bookkeeping for one plugin instance slot.
#[derive(Default)]
struct Breaker {
    panics: Vec<Instant>,
    open_until: Option<Instant>,
}

impl Breaker {
    /// Records a panic; returns how long to wait before recreating the instance.
    fn panicked(&mut self, plugin: &str) -> Duration {
        let now = Instant::now();
        self.panics
            .retain(|t| now.duration_since(*t) < PANIC_WINDOW);
        self.panics.push(now);
        if self.panics.len() >= PANIC_LIMIT {
            self.open_until = Some(now + BREAKER_OPEN);
            self.panics.clear();
            error!(plugin, panics = PANIC_LIMIT, window = ?PANIC_WINDOW, pause = ?BREAKER_OPEN,
                   "plugin keeps panicking: circuit breaker open");
            BREAKER_OPEN
        } else {
            crate::outbox::backoff(self.panics.len() as u32 - 1, Duration::from_secs(60))
        }
    }

    fn open_for(&self) -> Option<Duration> {
        self.open_until
            .and_then(|t| t.checked_duration_since(Instant::now()))
    }
}

/// A sink plugin as an outbox sink: created on first use, recreated after a panic.
pub struct PluginSink {
    lib: Library,
    config: String,
    table: Table,
    instance: *mut c_void,
    breaker: Breaker,
    not_before: Option<Instant>,
    /// The sink's `timeout`, passed to the plugin as its budget.
    timeout_ms: u32,
}

// The instance is only ever used by the one thread that owns this value at a time (ABI rule).
unsafe impl Send for PluginSink {}

impl PluginSink {
    pub fn new(
        lib: Library,
        config: &serde_json::Value,
        services: Arc<HostServices>,
        timeout: Duration,
    ) -> PluginSink {
        PluginSink {
            timeout_ms: timeout.as_millis().min(u128::from(u32::MAX)) as u32,
            lib,
            config: config.to_string(),
            table: Table::new(services),
            instance: std::ptr::null_mut(),
            breaker: Breaker::default(),
            not_before: None,
        }
    }

    fn vtable(&self) -> &'static abi::SinkVTable {
        // SAFETY: checked non-null and large enough at load; the library is never unloaded.
        unsafe { &*self.lib.decl.sink }
    }

    /// Creates the instance if needed; `Err` is the reason it cannot be used now.
    fn ensure(&mut self) -> Result<(), Delivery> {
        if !self.instance.is_null() {
            return Ok(());
        }
        let wait = self.breaker.open_for().or_else(|| {
            self.not_before
                .and_then(|t| t.checked_duration_since(Instant::now()))
        });
        if let Some(wait) = wait {
            return Err(Delivery::Retry {
                after: Some(wait),
                error: format!("plugin {} is paused after panics", self.lib.name),
            });
        }
        let vt = self.vtable();
        let mut inst = std::ptr::null_mut();
        let api: *const HostApi = self.table.api;
        let config = self.config.clone();
        // SAFETY: a valid host table that outlives the instance; pointers valid for the call.
        let (status, err) = call(|w| unsafe { (vt.create)(api, Str::new(&config), &mut inst, w) });
        match status {
            abi::OK if !inst.is_null() => {
                self.instance = inst;
                Ok(())
            }
            abi::PANICKED => {
                let wait = self.breaker.panicked(&self.lib.name);
                self.not_before = Some(Instant::now() + wait);
                Err(Delivery::Retry {
                    after: Some(wait),
                    error: format!("plugin panicked in create: {err}"),
                })
            }
            _ => Err(Delivery::Retry {
                after: None,
                error: format!("plugin {} refused its configuration: {err}", self.lib.name),
            }),
        }
    }

    fn drop_instance(&mut self) {
        if !self.instance.is_null() {
            // SAFETY: created by this vtable's `create`; no call is running on it.
            unsafe { (self.vtable().destroy)(self.instance) };
            self.instance = std::ptr::null_mut();
        }
    }

    /// The plugin's health JSON, creating the instance if needed.
    pub fn health(&mut self) -> serde_json::Value {
        if let Err(d) = self.ensure() {
            return serde_json::json!({"ok": false, "detail": format!("{d:?}")});
        }
        let (vt, inst) = (self.vtable(), self.instance);
        // SAFETY: a live instance of this vtable.
        let (status, text) = call(|w| unsafe { (vt.health)(inst, w) });
        if status == abi::PANICKED {
            self.drop_instance();
            let wait = self.breaker.panicked(&self.lib.name);
            self.not_before = Some(Instant::now() + wait);
        }
        serde_json::from_str(&text)
            .unwrap_or_else(|_| serde_json::json!({"ok": false, "detail": text}))
    }
}

impl Drop for PluginSink {
    fn drop(&mut self) {
        self.drop_instance();
    }
}

impl crate::outbox::Sink for PluginSink {
    /// Creates the instance at start-up, so a sink with a downlink (cloud MQTT commands)
    /// connects before the first event flows.
    fn start(&mut self) {
        if let Err(e) = self.ensure() {
            warn!(plugin = %self.lib.name, problem = ?e, "sink plugin not ready at start; it is retried with its first batch");
        }
    }

    fn deliver(&mut self, batch: &[Event]) -> Delivery {
        if let Err(d) = self.ensure() {
            return d;
        }
        let json = serde_json::to_string(batch).unwrap_or_else(|_| "[]".into());
        let (vt, inst, timeout_ms) = (self.vtable(), self.instance, self.timeout_ms);
        let mut retry_after = 0u32;
        // SAFETY: a live instance of this vtable, called from one thread at a time.
        let (status, text) = call(|w| unsafe {
            (vt.deliver)(inst, Str::new(&json), timeout_ms, &mut retry_after, w)
        });
        let all = |reason: String| {
            Delivery::Rejected(batch.iter().map(|e| (e.seq, reason.clone())).collect())
        };
        match status {
            abi::OK => Delivery::Delivered,
            abi::RETRYABLE => Delivery::Retry {
                after: (retry_after > 0).then(|| Duration::from_millis(u64::from(retry_after))),
                error: text,
            },
            abi::PERMANENT => all(text),
            abi::BAD_CONFIG => {
                // Held, not dead-lettered: a wrong or rotated key must not cost the records.
                // The sink backs off up to its retry_max and says why in the log and status.
                error!(plugin = %self.lib.name, error = %text,
                       "the far end refuses the sink's configuration or credentials; holding its events until fixed");
                Delivery::Retry {
                    after: None,
                    error: format!("bad configuration or credentials: {text}"),
                }
            }
            abi::REJECTED => {
                let list: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
                let list: Vec<(i64, String)> = list
                    .iter()
                    .filter_map(|v| {
                        Some((
                            v["seq"].as_i64()?,
                            v["reason"].as_str().unwrap_or("rejected").to_string(),
                        ))
                    })
                    .collect();
                Delivery::Rejected(list)
            }
            abi::PANICKED => {
                self.drop_instance();
                let wait = self.breaker.panicked(&self.lib.name);
                self.not_before = Some(Instant::now() + wait);
                Delivery::Retry {
                    after: Some(wait),
                    error: format!("plugin panicked: {text}"),
                }
            }
            other => {
                warn!(plugin = %self.lib.name, status = other, "plugin returned an unknown status; treating the batch as refused");
                all(format!("unknown status {other}: {text}"))
            }
        }
    }
}

/// A running payment-source plugin.
pub struct PluginSource {
    lib: Library,
    table: Table,
    instance: *mut c_void,
    started: bool,
}

unsafe impl Send for PluginSource {}

impl PluginSource {
    /// Creates and starts the source on the calling (plain) thread.
    pub fn start(
        lib: Library,
        config: &serde_json::Value,
        services: Arc<HostServices>,
    ) -> Result<PluginSource, String> {
        // SAFETY: checked at load; never unloaded.
        let vt = unsafe { &*lib.decl.source };
        let table = Table::new(services);
        let mut inst = std::ptr::null_mut();
        let api: *const HostApi = table.api;
        let config = config.to_string();
        // SAFETY: valid table and pointers for the call.
        let (status, err) = call(|w| unsafe { (vt.create)(api, Str::new(&config), &mut inst, w) });
        if status != abi::OK || inst.is_null() {
            return Err(format!("create failed ({status}): {err}"));
        }
        let mut source = PluginSource {
            lib,
            table,
            instance: inst,
            started: false,
        };
        // SAFETY: a live instance.
        let (status, err) = call(|w| unsafe { (vt.start)(source.instance, w) });
        if status != abi::OK {
            return Err(format!("start failed ({status}): {err}"));
        }
        source.started = true;
        info!(plugin = %source.lib.name, "payment source started");
        Ok(source)
    }

    pub fn health(&self) -> serde_json::Value {
        let vt = unsafe { &*self.lib.decl.source };
        let (_, text) = call(|w| unsafe { (vt.health)(self.instance, w) });
        serde_json::from_str(&text)
            .unwrap_or_else(|_| serde_json::json!({"ok": false, "detail": text}))
    }
}

impl Drop for PluginSource {
    fn drop(&mut self) {
        // SAFETY: a live instance: stop joins its threads, then destroy frees it.
        let vt = unsafe { &*self.lib.decl.source };
        unsafe {
            if self.started {
                (vt.stop)(self.instance);
            }
            (vt.destroy)(self.instance);
        }
        let _ = &self.table;
    }
}

/// Keeps a payment source running: starts it on its own thread, and when starting fails or
/// panics, logs it and tries again with backoff (the circuit breaker pauses a source that keeps
/// panicking). The rest of the gateway serves on meanwhile.
pub struct SourceSupervisor {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SourceSupervisor {
    pub fn spawn(
        lib: Library,
        config: serde_json::Value,
        services: Arc<HostServices>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> SourceSupervisor {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let name = services.plugin.clone();
        let thread = std::thread::Builder::new()
            .name(format!("source-{name}"))
            .spawn(move || {
                let sleep = |d: Duration| {
                    let until = Instant::now() + d;
                    while !flag.load(Ordering::Acquire) && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                };
                let mut breaker = Breaker::default();
                let mut attempt = 0u32;
                while !flag.load(Ordering::Acquire) {
                    match PluginSource::start(lib.clone(), &config, services.clone()) {
                        Ok(source) => {
                            metrics.set("umeme_source_up", &[("source", name.as_str())], 1.0);
                            while !flag.load(Ordering::Acquire) {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            drop(source);
                            metrics.set("umeme_source_up", &[("source", name.as_str())], 0.0);
                            return;
                        }
                        Err(e) => {
                            metrics.inc("umeme_source_failures_total", &[("source", name.as_str())]);
                            let wait = if e.contains(&format!("({})", abi::PANICKED)) {
                                breaker.panicked(&name)
                            } else {
                                attempt += 1;
                                crate::outbox::backoff(attempt, Duration::from_secs(300))
                            };
                            error!(source = %name, error = %e, retry_in = ?wait, "payment source failed to start");
                            sleep(wait);
                        }
                    }
                }
            })
            .expect("spawn source supervisor thread");
        SourceSupervisor {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the source (joining its threads) and the supervisor.
    pub fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_version_is_the_highest_named() {
        let bytes = b"\0GLIBC_2.2.5\0GLIBC_2.34\0GLIBC_2.3\0GLIBC_PRIVATE\0";
        assert_eq!(glibc_required(bytes).as_deref(), Some("GLIBC_2.34"));
        assert_eq!(glibc_required(b"nothing"), None);
    }

    /// An ELF the test binary can always read: itself (a position-independent executable, or
    /// an executable; either way without the declaration).
    fn own_elf() -> Vec<u8> {
        std::fs::read("/proc/self/exe").unwrap()
    }

    #[test]
    fn an_elf_without_the_declaration_symbol_is_not_a_plugin() {
        let e = check_elf(&own_elf()).unwrap_err();
        assert!(
            matches!(e, ElfError::NoDeclaration | ElfError::NotShared(_)),
            "{e}"
        );
    }

    #[test]
    fn an_elf_for_another_machine_is_refused_before_its_symbols_are_read() {
        let mut bytes = own_elf();
        // e_machine: two bytes at offset 18, in the file's byte order (little-endian here).
        const EM_X86_64: u16 = 62;
        const EM_AARCH64: u16 = 183;
        let other = if cfg!(target_arch = "aarch64") {
            EM_X86_64
        } else {
            EM_AARCH64
        };
        bytes[18..20].copy_from_slice(&other.to_le_bytes());
        let e = check_elf(&bytes).unwrap_err();
        assert!(matches!(e, ElfError::WrongMachine { .. }), "{e}");
        assert!(e.to_string().contains("but this gateway runs on"), "{e}");
        // Another class (32-bit) is another machine too.
        let mut bytes = own_elf();
        bytes[4] = 1; // ELFCLASS32
        assert!(check_elf(&bytes).is_err());
    }

    #[test]
    fn garbage_and_truncated_files_are_errors_not_panics() {
        assert!(matches!(check_elf(b""), Err(ElfError::NotElf(_))));
        assert!(matches!(check_elf(b"\x7fELF"), Err(ElfError::NotElf(_))));
        assert!(matches!(
            check_elf(b"#!/bin/sh\n"),
            Err(ElfError::NotElf(_))
        ));
        let mut whole = own_elf();
        for len in [16, 52, 64, 200, 4096, whole.len() / 2] {
            let _ = check_elf(&whole[..len.min(whole.len())]);
        }
        // Headers with random bytes changed (bounded, seeded: the fuzz target goes further).
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let head = whole.len().min(4096);
        for _ in 0..500 {
            let at = rng.gen_range(0..head);
            let (was, now) = (whole[at], rng.gen::<u8>());
            whole[at] = now;
            let _ = check_elf(&whole);
            whole[at] = was;
        }
    }

    #[test]
    fn breaker_opens_after_repeated_panics() {
        let mut b = Breaker::default();
        for _ in 0..PANIC_LIMIT - 1 {
            assert!(b.panicked("x") <= Duration::from_secs(60));
            assert!(b.open_for().is_none());
        }
        assert_eq!(b.panicked("x"), BREAKER_OPEN);
        assert!(b.open_for().is_some());
    }
}
