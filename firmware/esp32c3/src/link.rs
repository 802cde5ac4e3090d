//! The byte stream an MQTT session runs over: plain TCP, or TLS 1.3 over it to the gateway's
//! `[broker] tls_listen` (embedded-tls, no allocator). The meter trusts only the site CA built
//! in at build time (`config::GATEWAY_CA_DER`) and checks that the gateway's certificate
//! carries `config::GATEWAY_TLS_NAME`. Certificate dates are not checked: a meter has no
//! clock it can trust before it reaches the gateway.

#[cfg(gateway_tls)]
use core::cell::RefCell;

use embassy_net::tcp::TcpSocket;
#[cfg(gateway_tls)]
use embedded_io_async::ErrorType;
use embedded_io_async::{Read, Write};
#[cfg(gateway_tls)]
use embedded_tls::pki::CertVerifier;
#[cfg(gateway_tls)]
use embedded_tls::{
    Aes128GcmSha256, Certificate, CryptoProvider, CryptoRng, FlushPolicy, NoClock, TlsConfig,
    TlsConnection, TlsContext, TlsError, TlsVerifier,
};
#[cfg(gateway_tls)]
use esp_hal::rng::Rng;

#[cfg(gateway_tls)]
use crate::config;

#[cfg(gateway_tls)]
/// The gateway's records are at most 4 KiB of plaintext (`max_fragment_size` on its TLS
/// listener), plus the record header, content type and AEAD tag.
pub const TLS_READ: usize = 4096 + 256;
#[cfg(gateway_tls)]
/// What the meter sends in one record: a CONNECT, a report or an ack (the ClientHello is built
/// here too, about 200 bytes).
pub const TLS_WRITE: usize = 1024;
#[cfg(gateway_tls)]
/// The gateway's certificate is kept for the CertificateVerify check: a P-256 certificate with
/// a few names is about 600 bytes.
const CERT_MAX: usize = 1536;

/// What the session needs of its byte stream beyond reading and writing.
pub trait Link: Read + Write {
    /// Sends what the session wrote since the last push: TLS seals and sends its buffered
    /// record here; TCP has already sent.
    async fn push(&mut self) -> Result<(), ()>;
    /// Waits until a `read` has something to return (or the peer closed). Cancel-safe: the
    /// session waits for this inside a `select` with its timers and reads only afterwards,
    /// because a TLS read cancelled halfway through a record would lose the record's header.
    async fn readable(&mut self);
}

impl Link for TcpSocket<'_> {
    async fn push(&mut self) -> Result<(), ()> {
        Ok(())
    }

    async fn readable(&mut self) {
        self.wait_read_ready().await
    }
}

/// The TCP socket under a TLS connection, shared with [`TlsLink::readable`]. One task uses
/// both, and the readiness wait is polled only while no TLS read or write is, so the cell is
/// never borrowed twice at once.
#[cfg(gateway_tls)]
pub struct Shared<'c, 'r, 's>(pub &'c RefCell<&'r mut TcpSocket<'s>>);

#[cfg(gateway_tls)]
impl ErrorType for Shared<'_, '_, '_> {
    type Error = embassy_net::tcp::Error;
}

#[cfg(gateway_tls)]
impl Read for Shared<'_, '_, '_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let mut socket = self.0.borrow_mut();
        socket.read(buf).await
    }
}

#[cfg(gateway_tls)]
impl Write for Shared<'_, '_, '_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        let mut socket = self.0.borrow_mut();
        socket.write(buf).await
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        let mut socket = self.0.borrow_mut();
        socket.flush().await
    }
}

/// A TLS session as the MQTT session's byte stream.
#[cfg(gateway_tls)]
pub struct TlsLink<'a, 'c, 'r, 's> {
    tls: TlsConnection<'a, Shared<'c, 'r, 's>, Aes128GcmSha256>,
    socket: &'c RefCell<&'r mut TcpSocket<'s>>,
    /// The last read filled the caller's buffer: decrypted bytes may be waiting in the TLS
    /// connection that the socket's readiness would not show.
    more: bool,
}

#[cfg(gateway_tls)]
impl ErrorType for TlsLink<'_, '_, '_, '_> {
    type Error = TlsError;
}

#[cfg(gateway_tls)]
impl Read for TlsLink<'_, '_, '_, '_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let n = self.tls.read(buf).await?;
        self.more = n == buf.len();
        Ok(n)
    }
}

#[cfg(gateway_tls)]
impl Write for TlsLink<'_, '_, '_, '_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.tls.write(buf).await
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        self.tls.flush().await
    }
}

#[cfg(gateway_tls)]
impl Link for TlsLink<'_, '_, '_, '_> {
    async fn push(&mut self) -> Result<(), ()> {
        self.tls.flush().await.map_err(|_| ())
    }

    async fn readable(&mut self) {
        if !self.more {
            self.socket.borrow().wait_read_ready().await
        }
    }
}

#[cfg(gateway_tls)]
/// The hardware RNG. esp-hal marks only its ADC-fed `Trng` as cryptographic; that ADC is the
/// meter's current sensor here. With the WiFi radio running (it is, before any TLS), the RNG
/// mixes RF noise and Espressif documents its output as true random numbers.
pub struct RadioRng(pub Rng);

#[cfg(gateway_tls)]
impl rand_core::RngCore for RadioRng {
    fn next_u32(&mut self) -> u32 {
        self.0.random()
    }
    fn next_u64(&mut self) -> u64 {
        (u64::from(self.0.random()) << 32) | u64::from(self.0.random())
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.read(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.read(dest);
        Ok(())
    }
}

#[cfg(gateway_tls)]
impl CryptoRng for RadioRng {}

#[cfg(gateway_tls)]
struct SiteCa {
    rng: RadioRng,
    verifier: CertVerifier<'static, Aes128GcmSha256, NoClock, CERT_MAX>,
}

#[cfg(gateway_tls)]
impl CryptoProvider for SiteCa {
    type CipherSuite = Aes128GcmSha256;
    // No client certificate: the meter proves itself by its MQTT secret.
    type Signature = [u8; 0];

    fn rng(&mut self) -> impl embedded_tls::CryptoRngCore {
        &mut self.rng
    }

    fn verifier(&mut self) -> Result<&mut impl TlsVerifier<Aes128GcmSha256>, TlsError> {
        Ok(&mut self.verifier)
    }
}

#[cfg(gateway_tls)]
/// TLS 1.3 handshake on `socket`: the gateway must prove the name with a certificate of the
/// site CA.
pub async fn open<'a, 'c, 'r, 's>(
    socket: &'c RefCell<&'r mut TcpSocket<'s>>,
    read: &'a mut [u8; TLS_READ],
    write: &'a mut [u8; TLS_WRITE],
) -> Result<TlsLink<'a, 'c, 'r, 's>, TlsError>
where
    'c: 'a,
    'r: 'a,
    's: 'a,
{
    let mut tls = TlsConnection::new(Shared(socket), read, write);
    // One MQTT packet, one record, no wait for the TCP ACK (as on plain TCP).
    tls.set_flush_policy(FlushPolicy::Relaxed);
    let tls_config = TlsConfig::new().with_server_name(config::GATEWAY_TLS_NAME);
    let provider = SiteCa {
        rng: RadioRng(Rng::new()),
        verifier: CertVerifier::new(Certificate::X509(config::GATEWAY_CA_DER)),
    };
    tls.open(TlsContext::new(&tls_config, provider)).await?;
    Ok(TlsLink {
        tls,
        socket,
        more: false,
    })
}
