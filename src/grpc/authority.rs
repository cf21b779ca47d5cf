//! Lets gRPC clients that are not written in Go call the driver: a filter
//! on each accepted connection that rewrites an HTTP/2 `:authority` the
//! HTTP/2 layer under tonic would refuse, and logs every call it refuses.
//!
//! Over a Unix socket, gRPC clients send the socket as the request's
//! `:authority`: grpcio (Python, C++, Ruby...) sends the path
//! percent-encoded (`run%2Fx.sock` for `unix:///run/x.sock`), grpc-java and
//! grpc-swift send it too. Go's clients (the kubelet, the sidecars) send
//! `localhost`. hyperium/h2, under tonic, parses `:authority` as a URI
//! authority and resets the stream with PROTOCOL_ERROR when that fails,
//! before any service code runs and with nothing above debug level in the
//! log: every call of such a client fails with "Stream removed". The fix
//! belongs in h2 (pull request hyperium/h2#487 makes a malformed authority
//! no longer fatal); until a release has it, this module keeps tonic and
//! works around it. Remove it, and `serve` goes back to the bare socket,
//! once h2 accepts such an authority.
//!
//! How: the bytes the client sends are parsed as HTTP/2 frames. Every frame
//! passes byte for byte, except header blocks (HEADERS and its
//! CONTINUATIONs): each is decoded with an HPACK decoder that follows the
//! client's dynamic table. Until a block carries an authority that h2 would
//! refuse, blocks pass unchanged too. From that block on, every block of
//! the connection is re-encoded as literals that h2 does not index (so h2's
//! dynamic table, which then no longer follows the client's, is never read
//! again), with the bad authority replaced by `localhost`; table size
//! updates at the start of a block pass through as they came; padding is
//! dropped. The authority means nothing to the driver: it serves one
//! socket. Anything the filter cannot parse is passed on untouched from
//! there on, so h2 reports it as it would have.
//!
//! The bytes the driver sends back are watched for RST_STREAM and GOAWAY
//! frames with an error code: each is logged at warn with the call's
//! method, so a refused call is never silent.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame types (RFC 9113 §6).
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
/// Frame flags.
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame payload a peer must always accept (the HTTP/2 default of
/// SETTINGS_MAX_FRAME_SIZE): re-encoded blocks are cut to it.
const MAX_FRAME: usize = 16_384;
/// Largest header block the filter buffers; a bigger one is passed on
/// untouched (h2 refuses it anyway: its header list limit is lower).
const MAX_BLOCK: usize = 1 << 20;
/// What replaces an authority h2 would refuse.
const LOCALHOST: &[u8] = b"localhost";
/// How many streams' methods are remembered for the refusal log.
const REMEMBERED_STREAMS: usize = 64;

/// A connection whose client bytes pass through the authority filter; see
/// the module docs.
pub(crate) struct AuthorityFix<T> {
    io: T,
    reader: Reader,
    watcher: Watcher,
    /// The client closed its side; what was left has been handed on.
    eof: bool,
}

impl<T> AuthorityFix<T> {
    /// Wraps an accepted connection.
    pub(crate) fn new(io: T) -> Self {
        AuthorityFix {
            io,
            reader: Reader::default(),
            watcher: Watcher::default(),
            eof: false,
        }
    }
}

impl<T: Connected> Connected for AuthorityFix<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.reader.has_output() || this.eof {
                this.reader.drain_into(buf);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.reader.finish();
                this.eof = true;
            } else {
                this.reader.feed(rb.filled());
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.watcher.feed(&buf[..n], &this.reader.methods);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            let take = left.min(b.len());
            this.watcher.feed(&b[..take], &this.reader.methods);
            left -= take;
            if left == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Where the reader is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In the connection preface, with this many bytes of it to go.
    Preface(usize),
    /// At a frame boundary, or inside a frame passed on as it streams in
    /// (`passing` bytes of it left).
    Frames,
    /// Passing everything on untouched: the stream is not HTTP/2 as the
    /// filter understands it; h2 will say what is wrong.
    Off,
}

/// A header block being collected (HEADERS, then CONTINUATIONs until
/// END_HEADERS).
struct Pending {
    stream: u32,
    /// The HEADERS frame's flags.
    flags: u8,
    /// Its priority fields, when it had them.
    priority: Option<[u8; 5]>,
    /// The block so far.
    block: Vec<u8>,
    /// The frames as they came, to pass on when the block needs no change.
    raw: Vec<u8>,
}

/// The client-to-driver side: parses frames and rewrites header blocks.
struct Reader {
    phase: Phase,
    /// Bytes of a passed-through frame's payload still to come.
    passing: usize,
    /// Received, not yet processed.
    input: Vec<u8>,
    /// Processed, not yet handed to h2 (`out_pos` of it already was).
    output: Vec<u8>,
    out_pos: usize,
    pending: Option<Pending>,
    /// Follows the client's HPACK dynamic table.
    decoder: Decoder<'static>,
    /// Every block is re-encoded from here on (see the module docs).
    rewriting: bool,
    /// The method of recent streams, for the refusal log.
    methods: VecDeque<(u32, String)>,
}

impl Default for Reader {
    fn default() -> Self {
        Reader {
            phase: Phase::Preface(PREFACE.len()),
            passing: 0,
            input: Vec::new(),
            output: Vec::new(),
            out_pos: 0,
            pending: None,
            decoder: Decoder::new(),
            rewriting: false,
            methods: VecDeque::new(),
        }
    }
}

impl Reader {
    fn has_output(&self) -> bool {
        self.out_pos < self.output.len()
    }

    fn drain_into(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.output.len() - self.out_pos);
        buf.put_slice(&self.output[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        if self.out_pos == self.output.len() {
            self.output.clear();
            self.out_pos = 0;
        }
    }

    /// Takes bytes from the client and processes as much as is complete.
    fn feed(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
        let used = self.process();
        self.input.drain(..used);
    }

    /// The client closed: hands on whatever is left as it came.
    fn finish(&mut self) {
        if let Some(p) = self.pending.take() {
            self.output.extend_from_slice(&p.raw);
        }
        self.output.append(&mut self.input);
    }

    /// Processes `self.input`; returns how many bytes of it were used.
    fn process(&mut self) -> usize {
        let mut at = 0;
        loop {
            let avail = self.input.len() - at;
            match self.phase {
                Phase::Off => {
                    self.output.extend_from_slice(&self.input[at..]);
                    return self.input.len();
                }
                Phase::Preface(left) => {
                    let n = left.min(avail);
                    let seen = PREFACE.len() - left;
                    if self.input[at..at + n] != PREFACE[seen..seen + n] {
                        self.phase = Phase::Off;
                        continue;
                    }
                    self.output.extend_from_slice(&self.input[at..at + n]);
                    at += n;
                    self.phase = if n == left {
                        Phase::Frames
                    } else {
                        Phase::Preface(left - n)
                    };
                    if avail == n {
                        return at;
                    }
                }
                Phase::Frames if self.passing > 0 => {
                    let n = self.passing.min(avail);
                    self.output.extend_from_slice(&self.input[at..at + n]);
                    at += n;
                    self.passing -= n;
                    if self.passing > 0 {
                        return at;
                    }
                }
                Phase::Frames => {
                    if avail < 9 {
                        return at;
                    }
                    let h = &self.input[at..at + 9];
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let kind = h[3];
                    if kind != HEADERS && kind != CONTINUATION {
                        if self.pending.is_some() {
                            // Only CONTINUATION may follow an unfinished
                            // block (RFC 9113 §6.10): not ours to fix.
                            self.give_up();
                            continue;
                        }
                        self.output.extend_from_slice(h);
                        at += 9;
                        self.passing = len;
                        continue;
                    }
                    if len > MAX_BLOCK {
                        self.give_up();
                        continue;
                    }
                    if avail < 9 + len {
                        return at;
                    }
                    let frame = self.input[at..at + 9 + len].to_vec();
                    at += 9 + len;
                    self.header_frame(&frame);
                }
            }
        }
    }

    /// Stops filtering: what is held back is handed on as it came, and so
    /// is everything after it.
    fn give_up(&mut self) {
        if let Some(p) = self.pending.take() {
            self.output.extend_from_slice(&p.raw);
        }
        self.phase = Phase::Off;
    }

    /// A complete HEADERS or CONTINUATION frame.
    fn header_frame(&mut self, frame: &[u8]) {
        let (kind, flags) = (frame[3], frame[4]);
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[9..];
        if kind == CONTINUATION {
            let Some(p) = self.pending.as_mut().filter(|p| p.stream == stream) else {
                self.give_up();
                self.output.extend_from_slice(frame);
                return;
            };
            p.block.extend_from_slice(payload);
            p.raw.extend_from_slice(frame);
            if p.block.len() > MAX_BLOCK {
                self.give_up();
                return;
            }
        } else {
            if self.pending.is_some() {
                self.give_up();
                self.output.extend_from_slice(frame);
                return;
            }
            let Some((priority, block)) = split_headers_payload(flags, payload) else {
                self.output.extend_from_slice(frame);
                self.phase = Phase::Off;
                return;
            };
            self.pending = Some(Pending {
                stream,
                flags,
                priority,
                block: block.to_vec(),
                raw: frame.to_vec(),
            });
        }
        if flags & END_HEADERS != 0 {
            let p = self.pending.take().expect("a block is pending");
            self.complete(p);
        }
    }

    /// A whole header block: decoded, then passed on or re-encoded.
    fn complete(&mut self, p: Pending) {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let decoded = self
            .decoder
            .decode_with_cb(&p.block, |n: Cow<'_, [u8]>, v: Cow<'_, [u8]>| {
                headers.push((n.into_owned(), v.into_owned()))
            });
        let Some(updates) = decoded.ok().and(size_updates_len(&p.block)) else {
            // h2 will find the same fault and say so.
            self.output.extend_from_slice(&p.raw);
            self.phase = Phase::Off;
            return;
        };
        if let Some((_, path)) = headers.iter().find(|(n, _)| n == b":path") {
            if self.methods.len() == REMEMBERED_STREAMS {
                self.methods.pop_front();
            }
            self.methods
                .push_back((p.stream, String::from_utf8_lossy(path).into_owned()));
        }
        let mut fixed = false;
        for (name, value) in &mut headers {
            if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                if !self.rewriting {
                    tracing::debug!(
                        authority = %String::from_utf8_lossy(value),
                        "a client sent an authority h2 refuses (a socket path, as grpcio and \
                         grpc-java do); read as localhost on this connection"
                    );
                }
                *value = LOCALHOST.to_vec();
                fixed = true;
            }
        }
        if !(fixed || self.rewriting) {
            self.output.extend_from_slice(&p.raw);
            return;
        }
        self.rewriting = true;
        let mut block = p.block[..updates].to_vec();
        for (name, value) in &headers {
            // Literal header field without indexing, new name (RFC 7541
            // §6.2.2), neither string Huffman-coded.
            block.push(0);
            put_string(&mut block, name);
            put_string(&mut block, value);
        }
        write_header_frames(&mut self.output, p.stream, p.flags, p.priority, &block);
    }
}

/// Splits a HEADERS payload into its priority fields and header block
/// fragment, dropping padding; `None` when the lengths do not add up.
fn split_headers_payload(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, r) = rest.split_first()?;
        pad = usize::from(n);
        rest = r;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (p, r) = rest.split_at_checked(5)?;
        priority = Some(p.try_into().ok()?);
        rest = r;
    }
    let end = rest.len().checked_sub(pad)?;
    Some((priority, &rest[..end]))
}

/// Length of the dynamic table size updates that open `block` (RFC 7541
/// §4.2: only allowed there); `None` if one is cut short.
fn size_updates_len(block: &[u8]) -> Option<usize> {
    let mut at = 0;
    while block.get(at).is_some_and(|b| b & 0xe0 == 0x20) {
        at += 1;
        if block[at - 1] & 0x1f == 0x1f {
            loop {
                let b = *block.get(at)?;
                at += 1;
                if b & 0x80 == 0 {
                    break;
                }
            }
        }
    }
    Some(at)
}

/// Appends an HPACK string literal, not Huffman-coded.
fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out)
        .expect("writing to a Vec cannot fail");
    out.extend_from_slice(s);
}

/// Writes `block` as a HEADERS frame (with `flags`' END_STREAM and
/// priority) and as many CONTINUATION frames as it needs, the last with
/// END_HEADERS.
fn write_header_frames(
    out: &mut Vec<u8>,
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: &[u8],
) {
    let first_room = MAX_FRAME - if priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = block.split_at(first_room.min(block.len()));
    let mut f = flags & END_STREAM;
    if priority.is_some() {
        f |= PRIORITY;
    }
    if rest.is_empty() {
        f |= END_HEADERS;
    }
    let prio_len = if priority.is_some() { 5 } else { 0 };
    frame_header(out, first.len() + prio_len, HEADERS, f, stream);
    if let Some(p) = priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, r) = rest.split_at(MAX_FRAME.min(rest.len()));
        rest = r;
        let f = if rest.is_empty() { END_HEADERS } else { 0 };
        frame_header(out, chunk.len(), CONTINUATION, f, stream);
        out.extend_from_slice(chunk);
    }
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = u32::try_from(len).expect("frames are cut to MAX_FRAME");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// The driver-to-client side: watches for frames that refuse a call.
#[derive(Default)]
struct Watcher {
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The payload kept of an RST_STREAM or GOAWAY (at most 256 bytes).
    kept: Vec<u8>,
    kind: u8,
    stream: u32,
    /// Off: the bytes stopped looking like frames (never expected).
    off: bool,
}

impl Watcher {
    fn feed(&mut self, mut bytes: &[u8], methods: &VecDeque<(u32, String)>) {
        while !bytes.is_empty() && !self.off {
            if self.left == 0 && self.header.len() < 9 {
                let n = (9 - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.header.len() < 9 {
                    return;
                }
                let h = &self.header;
                self.left = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.kind = h[3];
                self.stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                self.kept.clear();
                if self.left > (1 << 24) {
                    self.off = true;
                }
                if self.left == 0 {
                    self.frame_done(methods);
                }
                continue;
            }
            let n = self.left.min(bytes.len());
            if matches!(self.kind, RST_STREAM | GOAWAY) {
                let keep = n.min(256usize.saturating_sub(self.kept.len()));
                self.kept.extend_from_slice(&bytes[..keep]);
            }
            bytes = &bytes[n..];
            self.left -= n;
            if self.left == 0 {
                self.frame_done(methods);
            }
        }
    }

    fn frame_done(&mut self, methods: &VecDeque<(u32, String)>) {
        self.header.clear();
        let code = |b: &[u8]| {
            b.get(..4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        };
        match self.kind {
            RST_STREAM => {
                let Some(code) = code(&self.kept) else { return };
                // NO_ERROR and CANCEL end streams in normal use.
                if code == 0 || code == 8 {
                    return;
                }
                let method = methods
                    .iter()
                    .rev()
                    .find(|(s, _)| *s == self.stream)
                    .map_or("(unknown)", |(_, m)| m.as_str());
                tracing::warn!(
                    stream = self.stream,
                    method,
                    reason = reason(code),
                    "refused a call: the HTTP/2 layer reset its stream (HOSTPATH_CSI_LOG=h2=debug \
                     tells why)"
                );
            }
            GOAWAY => {
                let Some(code) = self.kept.get(4..).and_then(code) else {
                    return;
                };
                if code == 0 {
                    return;
                }
                let detail = String::from_utf8_lossy(self.kept.get(8..).unwrap_or_default());
                tracing::warn!(
                    reason = reason(code),
                    %detail,
                    "refused a connection: the HTTP/2 layer closed it with an error"
                );
            }
            _ => {}
        }
    }
}

/// An HTTP/2 error code's name (RFC 9113 §7).
fn reason(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "unknown error code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::Encoder;

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    fn request(authority: &str, path: &str) -> Headers {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    /// A HEADERS frame around `block`, with the given flags and payload
    /// prefix (pad length, priority) and padding.
    fn headers_frame(stream: u32, flags: u8, prefix: &[u8], block: &[u8], pad: usize) -> Vec<u8> {
        let mut f = Vec::new();
        frame_header(
            &mut f,
            prefix.len() + block.len() + pad,
            HEADERS,
            flags,
            stream,
        );
        f.extend_from_slice(prefix);
        f.extend_from_slice(block);
        f.extend(std::iter::repeat_n(0u8, pad));
        f
    }

    fn data_frame(stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        frame_header(&mut f, payload.len(), 0x0, END_STREAM, stream);
        f.extend_from_slice(payload);
        f
    }

    /// Runs `input` through a reader in chunks of `chunk` bytes.
    fn filter(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut r = Reader::default();
        for c in input.chunks(chunk) {
            r.feed(c);
        }
        r.finish();
        r.output
    }

    /// Parses what h2 would get: frames after the preface; header blocks
    /// decoded with a decoder of its own, as h2's follows what it is sent.
    fn as_h2_sees_it(bytes: &[u8]) -> (Vec<(u32, Headers)>, Vec<Vec<u8>>) {
        assert!(bytes.starts_with(PREFACE));
        let mut at = PREFACE.len();
        let mut decoder = Decoder::new();
        let mut blocks = Vec::new();
        let mut data = Vec::new();
        let mut block = Vec::new();
        while at < bytes.len() {
            let h = &bytes[at..at + 9];
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
            let payload = &bytes[at + 9..at + 9 + len];
            at += 9 + len;
            match kind {
                HEADERS => {
                    let (_, b) = split_headers_payload(flags, payload).unwrap();
                    block = b.to_vec();
                }
                CONTINUATION => block.extend_from_slice(payload),
                _ => {
                    data.push(payload.to_vec());
                    continue;
                }
            }
            if flags & END_HEADERS != 0 {
                blocks.push((stream, decoder.decode(&block).unwrap()));
            }
        }
        (blocks, data)
    }

    fn authority(h: &Headers) -> &[u8] {
        &h.iter().find(|(n, _)| n == b":authority").unwrap().1
    }

    /// grpcio's case: the socket path as authority, indexed by the client's
    /// encoder, so the second request refers to its dynamic table. Every
    /// request reaches h2 with `localhost` and everything else intact,
    /// however the bytes are split across reads.
    #[test]
    fn a_socket_path_authority_becomes_localhost_in_every_request() {
        let mut enc = Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(data_frame(0, b"settings-ish")); // any other frame
        let mut expected = Vec::new();
        for (stream, path) in [
            (1, "/csi.v1.Identity/GetPluginInfo"),
            (3, "/csi.v1.Identity/Probe"),
        ] {
            let req = request("run%2Fx.sock", path);
            let block = enc.encode(req.iter().map(|(n, v)| (&n[..], &v[..])));
            input.extend(headers_frame(stream, END_HEADERS, &[], &block, 0));
            input.extend(data_frame(stream, b"\0\0\0\0\0"));
            expected.push((stream, req));
        }
        for chunk in [1, 2, 7, 9, 10, 4096] {
            let (blocks, data) = as_h2_sees_it(&filter(&input, chunk));
            assert_eq!(blocks.len(), 2);
            for ((stream, got), (want_stream, want)) in blocks.iter().zip(&expected) {
                assert_eq!(stream, want_stream);
                assert_eq!(authority(got), b"localhost");
                assert!(http::uri::Authority::try_from(authority(got)).is_ok());
                let others = |h: &Headers| {
                    h.iter()
                        .filter(|(n, _)| n != b":authority")
                        .cloned()
                        .collect::<Vec<_>>()
                };
                assert_eq!(others(got), others(want));
            }
            assert_eq!(
                data,
                [
                    b"settings-ish".to_vec(),
                    b"\0\0\0\0\0".to_vec(),
                    b"\0\0\0\0\0".to_vec()
                ]
            );
        }
    }

    /// Go's clients send `localhost`: their bytes reach h2 unchanged.
    #[test]
    fn a_good_authority_passes_byte_for_byte() {
        let mut enc = Encoder::new();
        let mut input = PREFACE.to_vec();
        for stream in [1, 3, 5] {
            let req = request("localhost", "/csi.v1.Node/NodeGetInfo");
            let block = enc.encode(req.iter().map(|(n, v)| (&n[..], &v[..])));
            input.extend(headers_frame(
                stream,
                END_HEADERS | END_STREAM,
                &[],
                &block,
                0,
            ));
        }
        for chunk in [1, 5, 100] {
            assert_eq!(filter(&input, chunk), input);
        }
    }

    /// A block split over CONTINUATION frames, padding and priority on the
    /// HEADERS frame, and a dynamic table size update at the block's start:
    /// decoded right, the update passed on, priority and END_STREAM kept.
    #[test]
    fn continuation_padding_priority_and_table_size_updates() {
        let mut enc = Encoder::new();
        let req = request("%2Ftmp%2Fcsi.sock", "/csi.v1.Controller/CreateVolume");
        let mut block = vec![0x3f, 0xe1, 0x0f]; // size update to 2048
        block.extend(enc.encode(req.iter().map(|(n, v)| (&n[..], &v[..]))));
        let (a, b) = block.split_at(10);
        let prefix = [3u8, 0x80, 0, 0, 1, 16]; // pad length 3, priority fields
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(
            7,
            PADDED | PRIORITY | END_STREAM,
            &prefix,
            a,
            3,
        ));
        let mut cont = Vec::new();
        frame_header(&mut cont, b.len(), CONTINUATION, END_HEADERS, 7);
        cont.extend_from_slice(b);
        input.extend(cont);
        for chunk in [1, 3, 64] {
            let out = filter(&input, chunk);
            let (blocks, _) = as_h2_sees_it(&out);
            assert_eq!(blocks.len(), 1);
            assert_eq!(authority(&blocks[0].1), b"localhost");
            let h = &out[PREFACE.len()..PREFACE.len() + 9];
            assert_eq!(h[3], HEADERS);
            assert_eq!(
                h[4],
                PRIORITY | END_STREAM | END_HEADERS,
                "one frame, no padding"
            );
            let payload = &out[PREFACE.len() + 9..];
            assert_eq!(&payload[..5], &prefix[1..], "priority fields kept");
            assert_eq!(&payload[5..8], &[0x3f, 0xe1, 0x0f], "size update first");
        }
    }

    /// A header block bigger than a frame is cut into CONTINUATIONs.
    #[test]
    fn big_blocks_are_cut_to_the_frame_size() {
        let mut req = request("a/b", "/x");
        req.push((b"x-big".to_vec(), vec![b'v'; 40_000]));
        let block = Encoder::new().encode(req.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(1, END_HEADERS, &[], &block, 0));
        let out = filter(&input, 1000);
        let (blocks, _) = as_h2_sees_it(&out);
        assert_eq!(authority(&blocks[0].1), b"localhost");
        assert_eq!(blocks[0].1.last().unwrap().1.len(), 40_000);
        let first_len = u32::from_be_bytes([0, out[24], out[25], out[26]]) as usize;
        assert!(first_len <= MAX_FRAME);
    }

    /// What the filter cannot parse reaches h2 as it came.
    #[test]
    fn garbage_passes_untouched() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(filter(&input, 3), input);
        let mut bad = PREFACE.to_vec();
        bad.extend(headers_frame(1, END_HEADERS, &[], &[0xff, 0xff, 0xff], 0));
        bad.extend(data_frame(1, b"after"));
        assert_eq!(filter(&bad, 2), bad);
    }

    #[test]
    fn the_watcher_reads_resets_split_anywhere() {
        let mut out = Vec::new();
        frame_header(&mut out, 4, RST_STREAM, 0, 1);
        out.extend_from_slice(&1u32.to_be_bytes());
        frame_header(&mut out, 10, GOAWAY, 0, 0);
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(b"hi");
        let methods = VecDeque::from([(1, "/csi.v1.Identity/Probe".to_string())]);
        for chunk in [1, 4, 100] {
            let mut w = Watcher::default();
            for c in out.chunks(chunk) {
                w.feed(c, &methods);
            }
            assert!(!w.off);
            assert_eq!(w.kind, GOAWAY);
            assert_eq!(w.kept.len(), 10);
            assert!(w.header.is_empty());
        }
    }
}
