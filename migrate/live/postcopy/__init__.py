"""Post-copy: the guest runs on the target before all of its memory is there (QEMU's postcopy-ram).

At the switch the source pauses its guest for good and sends the vCPU and device state with the
bitmap of the pages the target still lacks (`Postcopy`). The target makes those pages missing
(given back to the host, then registered with userfaultfd: `hv.kvm.userfault`), resumes the guest
and fills them from two directions:

- **on demand**: a thread that touches a missing page (a vCPU in KVM_RUN, a device thread) waits
  in the kernel; the target's fetcher sends the page's address on the fetch channel (a connection
  of its own, so an urgent page never waits behind the background stream) and places the page the
  source sends back (`PostcopyFetcher`);
- **in the background**: the source pushes every page still unsent on the main connection, from
  just after the most recent fault first (a guest that faulted there is likely to go on there),
  and sequentially from there (`PostcopySource.push`).

A page is placed once (`hv.kvm.userfault`): whichever copy arrives first wins, the other is a
no-op; both are the same bytes, since the source's memory no longer changes. Pages are decoded by
the C data path into a staging buffer laid out as guest RAM (never into guest RAM itself, which a
running guest owns) and placed from there by UFFDIO_COPY, with the stream format's checksums
checked on the way as for any PAGES.

The end digest (END, by 4 KiB page: `formats.POSTCOPY_DIGEST_BLOCK`) proves the target's memory
is what the source held at the switch plus what the guest wrote since. How: the digest is one
hash per page. The target hashes pre-copy pages as they are placed, and has them all hashed
before the guest runs there (`BlockHashes.current` at the switch); the pages missing at the
switch it hashes from the staging buffer, which holds exactly the bytes that were placed for
them and which the guest never writes. The combination is the digest of "every page as the
target placed it", which the source computes over its paused memory: equal digests mean every
page the guest started from on the target was the source's page at the switch, and what differs
in guest memory now is only what the guest wrote since. That holds if each missing page reached
guest memory only from staging: a page something populated before registration would keep what
it had (UFFDIO_COPY finds it in place, EEXIST), so the target also requires that no copy found
a missing page in place (`placed_elsewhere`); after a `Discard` the protocol takes no more pages.

Here: `missing` (the bitmap of missing pages on the wire, the pages given back, the page digest),
`serve` (the source's pages served on demand and pushed: `PostcopySource`), `place` (the target's
pages registered and placed: `PostcopyTarget`), and the two halves of the exchange after the
switch: `source` (the switch, the serving, the reconnection) and `target` (Discard, the switch,
the finish, the wait for a source that lost its link).
"""
