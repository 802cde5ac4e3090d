//! The byte stream an MQTT session runs over: plain TCP, or TLS 1.3 over it to the gateway's
//! `[broker] tls_listen` (embedded-tls, no allocator). The meter trusts only the site CA built
//! in at build time (`config::GATEWAY_CA_DER`) and checks that the gateway's certificate
//! carries `config::GATEWAY_TLS_NAME`. Certificate dates are not checked: a meter has no
//! clock it can trust before it reaches the gateway.

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

/// Sends what the session wrote since the last push.
pub trait Link: Read + Write {
    /// TLS seals and sends its buffered record here; TCP has already sent.
    async fn push(&mut self) -> Result<(), ()>;
}

impl Link for embassy_net::tcp::TcpSocket<'_> {
    async fn push(&mut self) -> Result<(), ()> {
        Ok(())
    }
}

#[cfg(gateway_tls)]
impl<S: Read + Write> Link for TlsConnection<'_, S, Aes128GcmSha256> {
    async fn push(&mut self) -> Result<(), ()> {
        self.flush().await.map_err(|_| ())
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
pub async fn open<'a, S: Read + Write + 'a>(
    socket: S,
    read: &'a mut [u8; TLS_READ],
    write: &'a mut [u8; TLS_WRITE],
) -> Result<TlsConnection<'a, S, Aes128GcmSha256>, TlsError> {
    let mut tls = TlsConnection::new(socket, read, write);
    // One MQTT packet, one record, no wait for the TCP ACK (as on plain TCP).
    tls.set_flush_policy(FlushPolicy::Relaxed);
    let tls_config = TlsConfig::new().with_server_name(config::GATEWAY_TLS_NAME);
    let provider = SiteCa {
        rng: RadioRng(Rng::new()),
        verifier: CertVerifier::new(Certificate::X509(config::GATEWAY_CA_DER)),
    };
    tls.open(TlsContext::new(&tls_config, provider)).await?;
    Ok(tls)
}
