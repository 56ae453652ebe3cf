// Package postcopy moves the pages a migration has not sent yet after the
// guest already runs on the destination: the destination's missing pages
// are registered with userfaultfd (internal/uffd), a vCPU that touches one
// waits while the page is fetched from the source on an urgent channel,
// and the source pushes every other remaining page on a bulk channel in
// the background, next to the most recent fault first.
//
// A Target is the destination's half, a Source the source's. Both run over
// two connections the caller has opened and authenticated (urgent and
// bulk, so a requested page never queues behind the push); the frames are
// in wire.go. Once every page has arrived the destination sends the
// digest of its memory as it was at the switch (pages present then, plus
// each missing page as it arrived, before the guest could touch it) with
// the machine state: the same switch-over digest the source computes from
// its paused guest, so equal digests prove the destination started from
// the source's exact image.
//
// A link that fails mid-way ends Run on both sides with ErrLink; nothing
// is lost. The destination's faulting vCPUs stay blocked in the kernel
// (nobody reads the userfaultfd between runs), and Run with new
// connections resumes: the destination first sends the set of pages it
// still lacks, so pages that were in flight when the link failed are sent
// again.
//
// What this package must never do: wait without a deadline (every read
// and write on the wire has one, the userfaultfd is polled), trust a page
// index or count from the wire without bounding it, or close the
// userfaultfd while the guest may still touch a page that never arrived
// (the kernel would then hand it a zero page: a silently wrong guest).
package postcopy
