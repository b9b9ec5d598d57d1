//! The gRPC codec for every joinery service: tonic-prost's codec, except that
//! a request that is not valid protobuf is answered `INVALID_ARGUMENT` (the
//! client sent bad bytes) instead of prost's default `INTERNAL` (which would
//! tell an integrator the broker is broken). Selected for generated code by
//! `codec_path` in `build.rs`.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstDecoder, ProstEncoder};

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
        StrictDecoder(ProstDecoder::default())
    }
}

/// Decodes with prost and reports undecodable input as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            if status.code() == Code::Internal {
                let mut status = Status::invalid_argument(format!(
                    "malformed_request: not a valid protobuf message ({})",
                    status.message()
                ));
                status.metadata_mut().insert(
                    crate::service::status::REASON_KEY,
                    tonic::metadata::MetadataValue::from_static("malformed_request"),
                );
                status
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
