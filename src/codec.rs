//! The gRPC codec for every joinery service: tonic-prost's codec, except that
//! a request that is not valid protobuf is answered `INVALID_ARGUMENT` (the
//! client sent bad bytes) instead of prost's default `INTERNAL` (which would
//! tell an integrator the broker is broken). Selected for generated code by
//! `codec_path` in `build.rs`.

use std::marker::PhantomData;

use bytes::{Buf, Bytes};
use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

/// Prost encoding with strict, client-facing decode errors.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(PhantomData)
    }
}

/// Decodes with prost and reports undecodable input as `INVALID_ARGUMENT`.
///
/// The message is first copied out of tonic's receive buffer, once, and
/// decoded from that copy, so that a payload (`bytes::Bytes`) is a slice of
/// the copy rather than a copy of its own. Decoding straight from tonic's
/// buffer would make the payload a slice of that buffer, which tonic then
/// cannot reuse: under callgrind, over 30,000 pipelined 1 KiB publishes,
/// that cost the runtime thread 24M instructions more in `memcpy` (tonic
/// growing fresh buffers) than the payload copies it saved.
#[derive(Debug, Clone)]
pub struct StrictDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let mut message = Vec::with_capacity(buf.remaining());
        while buf.has_remaining() {
            let chunk = buf.chunk();
            let n = chunk.len();
            message.extend_from_slice(chunk);
            buf.advance(n);
        }
        U::decode(Bytes::from(message)).map(Some).map_err(|e| {
            let mut status = Status::invalid_argument(format!(
                "malformed_request: not a valid protobuf message ({e})"
            ));
            status.metadata_mut().insert(
                crate::service::status::REASON_KEY,
                tonic::metadata::MetadataValue::from_static("malformed_request"),
            );
            status
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
