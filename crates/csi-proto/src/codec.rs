//! The protobuf codec, with one change from tonic-prost's: a request that
//! cannot be decoded (invalid UTF-8 in a string, a wrong wire type, a
//! truncated message) is the caller's mistake and answers INVALID_ARGUMENT.
//! tonic-prost answers INTERNAL, which a CO treats as a server fault and
//! retries forever.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder};

/// Codec used by the generated CSI services and clients.
#[derive(Debug, Clone)]
pub struct CsiCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for CsiCodec<T, U> {
    fn default() -> Self {
        CsiCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for CsiCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = CsiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CsiDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// Decoder that reports undecodable messages as INVALID_ARGUMENT.
#[derive(Debug)]
pub struct CsiDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for CsiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|e| match e.code() {
            Code::Internal => Status::invalid_argument(format!(
                "the request cannot be decoded as a CSI message: {}",
                e.message()
            )),
            _ => e,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
