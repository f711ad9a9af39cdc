//! A connection's write queue: encoded bytes, and large payloads written from where they
//! already are.
//!
//! A forwarded message's payload is a view of the source connection's read buffer
//! ([`bytes::Bytes`]). Below [`SHARE_FROM`] bytes it is copied behind its packet header, as
//! everything else is; from there on the queue keeps the view and the connection writes it
//! with the header in one vectored write (`writev`), so the payload goes from the read buffer
//! to the socket without a copy in between. Streams that do not write vectored get every byte
//! copied: WebSocket, where each write would become a WebSocket message of its own.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// Payloads of at least this many bytes are written from the read buffer, not copied: below
/// it, copying costs less than one more piece of a vectored write.
pub const SHARE_FROM: usize = 1024;

/// Most pieces handed to one vectored write (Linux takes 1,024).
pub const MAX_PIECES: usize = 128;

/// Bytes waiting to be written, in order: the encoded bytes in `tail`, with shared payloads
/// between them at the positions they were queued.
#[derive(Debug, Default)]
pub struct OutBuf {
    /// Everything encoded: packets, and the headers of packets whose payload is shared.
    tail: BytesMut,
    /// Shared payloads, each with the `tail` position (counted from the first byte ever
    /// queued, see `consumed`) it follows.
    shared: VecDeque<(usize, Bytes)>,
    /// `tail` bytes written and dropped so far.
    consumed: usize,
    /// Bytes of the first shared payload written already.
    into_first: usize,
    /// Shared bytes not written yet.
    shared_len: usize,
}

impl OutBuf {
    /// Bytes not written yet.
    pub fn len(&self) -> usize {
        self.tail.len() + self.shared_len
    }

    /// Nothing is left to write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where encoders write.
    pub fn bytes(&mut self) -> &mut BytesMut {
        &mut self.tail
    }

    /// Queues `payload` after what `bytes()` holds now, without copying it.
    pub fn share(&mut self, payload: Bytes) {
        if payload.is_empty() {
            return;
        }
        self.shared_len += payload.len();
        self.shared
            .push_back((self.consumed + self.tail.len(), payload));
    }

    /// The first piece: what a write that is not vectored takes.
    pub fn chunk(&self) -> &[u8] {
        match self.shared.front() {
            Some((at, p)) if *at == self.consumed => &p[self.into_first..],
            Some((at, _)) => &self.tail[..at - self.consumed],
            None => &self.tail,
        }
    }

    /// Fills `dst` with the pieces in order (at most `dst.len()` of them); returns how many.
    pub fn pieces<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let mut from = 0;
        for (i, (at, p)) in self.shared.iter().enumerate() {
            let at = at - self.consumed;
            if at > from {
                if n == dst.len() {
                    return n;
                }
                dst[n] = IoSlice::new(&self.tail[from..at]);
                n += 1;
                from = at;
            }
            if n == dst.len() {
                return n;
            }
            let skip = if i == 0 { self.into_first } else { 0 };
            dst[n] = IoSlice::new(&p[skip..]);
            n += 1;
        }
        if from < self.tail.len() && n < dst.len() {
            dst[n] = IoSlice::new(&self.tail[from..]);
            n += 1;
        }
        n
    }

    /// Drops the first `n` bytes (written). `n` is at most [`OutBuf::len`].
    pub fn advance(&mut self, mut n: usize) {
        assert!(n <= self.len(), "advanced past the queued bytes");
        while n > 0 {
            let before = self
                .shared
                .front()
                .map_or(self.tail.len(), |(at, _)| at - self.consumed);
            if before > 0 {
                let k = n.min(before);
                self.tail.advance(k);
                self.consumed += k;
                n -= k;
                continue;
            }
            let (_, first) = self
                .shared
                .front()
                .expect("bytes are left, so a payload is");
            let k = n.min(first.len() - self.into_first);
            self.into_first += k;
            self.shared_len -= k;
            n -= k;
            if self.into_first == first.len() {
                self.shared.pop_front();
                self.into_first = 0;
            }
        }
    }

    /// Drops everything (the connection is gone).
    pub fn clear(&mut self) {
        self.tail.clear();
        self.shared.clear();
        self.consumed = 0;
        self.into_first = 0;
        self.shared_len = 0;
    }

    /// Everything queued, copied into one buffer (tests read what was encoded).
    #[cfg(test)]
    pub fn to_bytes(&self) -> BytesMut {
        let mut pieces = vec![IoSlice::new(&[]); 2 * self.shared.len() + 1];
        let n = self.pieces(&mut pieces);
        let mut all = BytesMut::with_capacity(self.len());
        for p in &pieces[..n] {
            all.extend_from_slice(p);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random pushes of encoded bytes and shared payloads, drained by writes of random size
    /// over random numbers of pieces (a socket that takes less than it is given): the bytes
    /// come out in the order they went in, none lost or repeated.
    #[test]
    fn partial_writes_of_pieces_keep_the_stream_in_order() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..200 {
            let mut q = OutBuf::default();
            let (mut queued, mut written) = (Vec::new(), Vec::new());
            let mut next = 0u8;
            for _ in 0..1 + rand(40) {
                let len = rand(3000);
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        next = next.wrapping_add(1);
                        next
                    })
                    .collect();
                queued.extend_from_slice(&bytes);
                if rand(2) == 0 {
                    q.bytes().extend_from_slice(&bytes);
                } else {
                    q.share(Bytes::from(bytes));
                }
                assert_eq!(q.len(), queued.len() - written.len());
                // Sometimes write some of it before more is queued.
                if rand(3) == 0 {
                    drain_some(&mut q, &mut written, &mut rand);
                }
            }
            assert_eq!(q.to_bytes()[..], queued[written.len()..], "round {round}");
            while !q.is_empty() {
                drain_some(&mut q, &mut written, &mut rand);
            }
            assert_eq!(written, queued, "round {round}");
            assert!(q.shared.is_empty() && q.tail.is_empty() && q.shared_len == 0);
        }
    }

    /// One write: up to a random number of pieces, of which a random number of bytes "went".
    fn drain_some(q: &mut OutBuf, written: &mut Vec<u8>, rand: &mut impl FnMut(usize) -> usize) {
        if q.is_empty() {
            return;
        }
        let took = {
            let mut pieces = [IoSlice::new(&[]); 8];
            let n = q.pieces(&mut pieces[..1 + rand(8)]);
            assert!(n > 0 && pieces[..n].iter().all(|p| !p.is_empty()));
            assert_eq!(q.chunk(), &pieces[0][..], "the first piece is the chunk");
            let offered: usize = pieces[..n].iter().map(|p| p.len()).sum();
            let took = 1 + rand(offered);
            let mut left = took;
            for p in &pieces[..n] {
                let k = left.min(p.len());
                written.extend_from_slice(&p[..k]);
                left -= k;
            }
            took
        };
        q.advance(took);
    }

    #[test]
    fn a_shared_payload_is_the_buffer_it_came_from_not_a_copy() {
        let payload = Bytes::from(vec![9u8; 4096]);
        let mut q = OutBuf::default();
        q.bytes().extend_from_slice(b"head");
        q.share(payload.clone());
        q.bytes().extend_from_slice(b"next");
        let mut pieces = [IoSlice::new(&[]); 4];
        assert_eq!(q.pieces(&mut pieces), 3);
        assert_eq!(pieces[1].as_ptr(), payload.as_ptr());
        assert_eq!(
            (&pieces[0][..], &pieces[2][..]),
            (&b"head"[..], &b"next"[..])
        );
        q.clear();
        assert!(q.is_empty() && q.chunk().is_empty());
    }
}
