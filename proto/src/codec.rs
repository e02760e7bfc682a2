//! The codec of Weir's gRPC servers: tonic's prost codec, except that a
//! request that does not decode is the caller's fault.
//!
//! `tonic_prost::ProstCodec` answers an undecodable message with INTERNAL
//! (right for a client reading a broken server, wrong for a server reading
//! a broken request). The generated servers use [`RequestCodec`] (see
//! `build.rs`); the generated clients keep `ProstCodec`. Encoding, and so
//! every message a server sends, is `ProstCodec`'s own.

use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    Code, Status,
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] whose decode errors are INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct RequestCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        Self {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder {
            inner: self.inner.decoder(),
        }
    }
}

/// Decodes a request; a message that does not decode is INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct RequestDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: prost::Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(blame_the_request)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// `ProstDecoder` fails only on bytes that are not the message (INTERNAL);
/// other codes pass through.
fn blame_the_request(status: Status) -> Status {
    if status.code() == Code::Internal {
        Status::invalid_argument(format!(
            "the request is not a valid protobuf message: {}",
            status.message()
        ))
    } else {
        status
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::registry::v1::RegisterRequest;

    #[test]
    fn a_decode_error_becomes_invalid_argument() {
        // Field 1, wire type 7: no such wire type.
        let err = RegisterRequest::decode(&[0x0f_u8, 0xff, 0xff][..]).expect_err("garbage");
        let status = blame_the_request(Status::internal(err.to_string()));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("not a valid protobuf message"),
            "{status:?}"
        );
        let other = blame_the_request(Status::resource_exhausted("too big"));
        assert_eq!(other.code(), Code::ResourceExhausted);
    }
}
