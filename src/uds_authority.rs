//! Makes the kubelet's registration calls acceptable to the HTTP/2 server.
//!
//! The kubelet dials plugin registration sockets with grpc-go and the
//! socket's path as the dial target (`pluginmanager/operationexecutor`,
//! `dial`, v1.35.4), so its requests carry `:authority:
//! /var/lib/kubelet/plugins_registry/<name>-reg.sock`. The `h2` crate under
//! tonic rejects that as a malformed authority and resets every stream
//! (`RST_STREAM PROTOCOL_ERROR`, seen on a real kubelet: registration never
//! succeeds), and has no setting to allow it (hyperium/h2#487 is open).
//!
//! So the bytes from the client pass through this filter first: it walks
//! the HTTP/2 frames and, in each complete HEADERS block, replaces an
//! `:authority` given as a literal (the only way a new value reaches the
//! decoder) by `localhost`, which is what Kubernetes' own CSI client sends
//! on unix sockets. The representation keeps its kind, so the decoder's
//! dynamic table gets an entry at the same position as the client's (a
//! smaller one, so the decoder never evicts an entry the client can still
//! refer to) and later indexed references to it resolve to `localhost`.
//! Anything the filter does not understand is passed on unchanged.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// `:authority` in HPACK's static table.
const AUTHORITY_INDEX: u64 = 1;
const LOCALHOST: &[u8] = b"localhost";

/// Copies `from` to `to`, rewriting `:authority` in request headers.
pub(crate) async fn copy_rewriting<R, W>(mut from: R, mut to: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    if preface != PREFACE {
        // Not HTTP/2 with prior knowledge: let the server answer it.
        tokio::io::copy(&mut from, &mut to).await?;
        return to.shutdown().await;
    }
    let mut head = [0u8; 9];
    loop {
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        let (kind, flags) = (head[3], head[4]);
        if kind == HEADERS
            && flags & END_HEADERS != 0
            && let Some(new) = rewrite_headers(&payload, flags)
        {
            let n = new.len() as u32;
            head[0..3].copy_from_slice(&n.to_be_bytes()[1..]);
            to.write_all(&head).await?;
            to.write_all(&new).await?;
        } else {
            to.write_all(&head).await?;
            to.write_all(&payload).await?;
        }
        to.flush().await?;
    }
    to.shutdown().await
}

/// A HEADERS payload with its `:authority` literal replaced, or None when
/// there is nothing to replace (or the block cannot be parsed).
fn rewrite_headers(payload: &[u8], flags: u8) -> Option<Vec<u8>> {
    let mut start = 0;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = *payload.first()? as usize;
        start = 1;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    let end = payload.len().checked_sub(pad)?;
    if start > end {
        return None;
    }
    let block = &payload[start..end];
    let new_block = rewrite_block(block)?;
    // Padding is dropped (its length with it): it carries nothing.
    let mut out = Vec::with_capacity(new_block.len() + 5);
    let mut flags_prefix = &payload[..start];
    if flags & PADDED != 0 {
        // Keep the pad length byte but say zero padding follows.
        out.push(0);
        flags_prefix = &flags_prefix[1..];
    }
    out.extend_from_slice(flags_prefix);
    out.extend_from_slice(&new_block);
    Some(out)
}

/// Walks one header block; returns it rewritten if it had an `:authority`
/// literal other than `localhost`.
fn rewrite_block(block: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len());
    let mut i = 0;
    let mut changed = false;
    while i < block.len() {
        let b = block[i];
        if b & 0x80 != 0 {
            // Indexed field.
            let (_, n) = integer(&block[i..], 7)?;
            out.extend_from_slice(&block[i..i + n]);
            i += n;
            continue;
        }
        if b & 0xe0 == 0x20 {
            // Dynamic table size update.
            let (_, n) = integer(&block[i..], 5)?;
            out.extend_from_slice(&block[i..i + n]);
            i += n;
            continue;
        }
        // A literal: with incremental indexing (01, 6-bit index) or
        // without / never indexed (0000 / 0001, 4-bit index).
        let prefix = if b & 0xc0 == 0x40 { 6 } else { 4 };
        let (index, n) = integer(&block[i..], prefix)?;
        let mut j = i + n;
        if index == 0 {
            j += string_len(&block[j..])?;
        }
        let value_len = string_len(&block[j..])?;
        if index == AUTHORITY_INDEX {
            out.extend_from_slice(&block[i..j]);
            // The value: not Huffman-coded, 7-bit length prefix.
            out.push(LOCALHOST.len() as u8);
            out.extend_from_slice(LOCALHOST);
            changed = true;
        } else {
            out.extend_from_slice(&block[i..j + value_len]);
        }
        i = j + value_len;
    }
    changed.then_some(out)
}

/// An HPACK integer with an `n`-bit prefix: its value and encoded length.
fn integer(b: &[u8], n: u32) -> Option<(u64, usize)> {
    let max = (1u64 << n) - 1;
    let mut v = u64::from(*b.first()?) & max;
    if v < max {
        return Some((v, 1));
    }
    let mut shift = 0;
    for (k, byte) in b.iter().enumerate().skip(1) {
        v += u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some((v, k + 1));
        }
        shift += 7;
        if shift > 56 {
            return None;
        }
    }
    None
}

/// The encoded length of an HPACK string literal (prefix and octets).
fn string_len(b: &[u8]) -> Option<usize> {
    let (len, n) = integer(b, 7)?;
    let total = n.checked_add(usize::try_from(len).ok()?)?;
    (total <= b.len()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_literals_become_localhost_and_the_rest_is_kept() {
        // :method POST (indexed 3), :authority "/a/b.sock" literal with
        // incremental indexing (0x41), a literal header "te: trailers"
        // without indexing with a literal name, an indexed dynamic entry.
        let mut block = vec![0x83, 0x41, 9];
        block.extend_from_slice(b"/a/b.sock");
        block.extend_from_slice(&[0x00, 2]);
        block.extend_from_slice(b"te");
        block.push(8);
        block.extend_from_slice(b"trailers");
        block.push(0xbe);
        let out = rewrite_block(&block).unwrap();
        let mut want = vec![0x83, 0x41, 9];
        want.extend_from_slice(b"localhost");
        want.extend_from_slice(&[0x00, 2]);
        want.extend_from_slice(b"te");
        want.push(8);
        want.extend_from_slice(b"trailers");
        want.push(0xbe);
        assert_eq!(out, want);
        // Nothing to replace: None; garbage: None (passed on unchanged).
        assert_eq!(rewrite_block(&[0x83, 0xbe]), None);
        assert_eq!(rewrite_block(&[0x41, 50, b'x']), None);
        // Padded and prioritised HEADERS keep their layout.
        let mut payload = vec![3, 0, 0, 0, 1, 16];
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0, 0, 0]);
        let out = rewrite_headers(&payload, PADDED | PRIORITY | END_HEADERS).unwrap();
        assert_eq!(out[0], 0);
        assert_eq!(&out[1..6], &[0, 0, 0, 1, 16]);
        assert_eq!(&out[6..], &want[..]);
    }

    #[test]
    fn integers() {
        assert_eq!(integer(&[0x0a], 5), Some((10, 1)));
        assert_eq!(integer(&[0x1f, 0x9a, 0x0a], 5), Some((1337, 3)));
        assert_eq!(integer(&[0x1f, 0x9a], 5), None);
    }
}
