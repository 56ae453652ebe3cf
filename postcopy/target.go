package postcopy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/uffd"
	"github.com/tandemvm/tandem/precopy"
)

// DefaultRetryAfter is how long a vCPU's request may go unanswered
// before it is sent again (a request lost with a link, or a page the
// source has not got to yet).
const DefaultRetryAfter = time.Second

// TargetConfig is the destination's side of a switch to post-copy.
type TargetConfig struct {
	// Regions is the destination guest's memory, holding everything the
	// precopy rounds sent. The guest is paused.
	Regions []guest.Region
	// Missing holds the pages (index GPA>>12) the source still owes:
	// the pages dirty at the switch. The Target owns it from here.
	Missing *precopy.Bitmap
	// State is the machine state sent at the switch, for the digest.
	State guest.MachineState
	// VCPUs and VCPUOf attribute blocked time to vCPUs: VCPUOf maps a
	// faulting thread id to a vCPU index, or -1. nil: only the total.
	VCPUs  int
	VCPUOf func(tid uint32) int
	// RetryAfter and LinkTimeout: 0 means the defaults.
	RetryAfter  time.Duration
	LinkTimeout time.Duration
}

// TargetStats are the destination's post-copy figures.
type TargetStats struct {
	Active    bool   // pages are still missing
	Requests  uint64 // pages requested by a faulting vCPU (first request only)
	Faults    uint64 // faults on missing pages (several vCPUs may wait on one page)
	Remaining uint64 // pages not arrived yet
	Received  uint64 // pages installed
	// BlocktimeMs is the time each vCPU spent waiting for pages, in
	// milliseconds (index: vCPU); Blocktime is the sum over all waits,
	// vCPU or not.
	BlocktimeMs []int64
	Blocktime   time.Duration
	Digest      string // set once every page arrived

	// Waiting is, per vCPU, how long it has been blocked on the missing
	// page it waits for now (0: not waiting): through a link outage,
	// the vCPUs the guest cannot run until the source comes back.
	Waiting []time.Duration
	// LastHeard is when the last frame from the source arrived (zero:
	// none yet). A source that fell silent is declared gone a link
	// timeout later (LinkDownSince); this is when it really went.
	LastHeard time.Time
	// Runs counts the runs started (more than one: the link was
	// resumed); LinkDownSince is when the last run failed, zero while a
	// run is connected or once every page arrived. A destination whose
	// source stays away holds a guest that cannot go on: its caller
	// reports it lost rather than resume it with pages missing.
	Runs          int
	LinkDownSince time.Time
}

// waiter is a thread blocked on a missing page since t0.
type waiter struct {
	tid uint32
	t0  time.Time
}

// pending is a missing page some thread waits for.
type pending struct {
	requested time.Time // zero: request (again) at the next chance
	waiters   []waiter
}

// Target is the destination's half of post-copy. NewTarget prepares it
// while the guest is paused; the caller then resumes the guest and calls
// Run, again after a link failure, until Run returns nil.
type Target struct {
	cfg TargetConfig
	fd  *uffd.FD
	pm  pageMap

	// mu guards the fields below and orders a page's install against a
	// fault on it: a page leaves missing and pending under mu.
	mu      sync.Mutex
	missing *precopy.Bitmap
	pending map[uint64]*pending
	hash    *guest.MemHash
	stats   TargetStats
	// vcpuBlock is the blocked time per vCPU (stats.BlocktimeMs rounds it).
	vcpuBlock []time.Duration
	allIn     chan struct{} // closed when the last page arrived
	done      bool          // every page arrived: the userfaultfd is closed
	closed    bool          // Close ran
	loopErr   error         // the fault loop's failure, if it stopped on one

	// heard is when the last frame from the source arrived (UnixNano).
	heard atomic.Int64

	// The fault loop runs from NewTarget to finish or Close.
	loopStop, loopDone chan struct{}
	kick               chan struct{} // a new request is pending
}

// NewTarget registers the regions with userfaultfd, drops the missing
// pages' stale copies and hashes the pages the destination already holds
// (their content at the switch). Precondition: the guest is paused. An
// error wrapping uffd.ErrUnavailable means this memory cannot be served
// by faults: registration is tried first, so nothing has changed then
// and the migration can go on precopy-only. After a failed drop
// (also ErrUnavailable) some missing pages may read as zero: the caller
// must not resume this guest without sending them.
func NewTarget(cfg TargetConfig) (*Target, error) {
	if cfg.Missing == nil {
		return nil, errors.New("postcopy: no missing-page set")
	}
	cfg.RetryAfter = cmpOr(cfg.RetryAfter, DefaultRetryAfter)
	cfg.LinkTimeout = cmpOr(cfg.LinkTimeout, DefaultLinkTimeout)
	t := &Target{cfg: cfg, pm: newPageMap(cfg.Regions), missing: cfg.Missing,
		pending: map[uint64]*pending{}, allIn: make(chan struct{}),
		loopStop: make(chan struct{}), loopDone: make(chan struct{}), kick: make(chan struct{}, 1)}
	t.vcpuBlock = make([]time.Duration, max(cfg.VCPUs, 0))
	if cfg.Missing.Len() < t.pm.limit {
		return nil, fmt.Errorf("postcopy: missing-page set covers %d pages, memory %d", cfg.Missing.Len(), t.pm.limit)
	}
	fd, err := uffd.Open()
	if err != nil {
		return nil, err
	}
	// Register first: memory userfaultfd cannot take is refused before
	// anything of it changed, and the guest stays precopy-only.
	for i, r := range cfg.Regions {
		if err := fd.Register(r.Mem); err != nil {
			for _, done := range cfg.Regions[:i] {
				fd.Unregister(done.Mem)
			}
			fd.Close()
			return nil, err
		}
	}
	if err := t.dropMissing(); err != nil {
		for _, r := range cfg.Regions {
			fd.Unregister(r.Mem)
		}
		fd.Close()
		return nil, err
	}
	t.hash = hashPresent(cfg.Regions, cfg.Missing)
	t.fd = fd
	t.stats.Remaining = cfg.Missing.Count()
	t.stats.Active = t.stats.Remaining > 0
	if !t.stats.Active {
		close(t.allIn)
	}
	go t.faultLoop() // owned by t: finish and Close stop and join it
	return t, nil
}

func cmpOr(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// dropMissing unmaps the missing pages (MADV_DONTNEED on private
// anonymous memory): they hold what an earlier round sent, and the guest
// must fault on them instead of reading that.
func (t *Target) dropMissing() error {
	for _, run := range runsOf(t.missing, t.pm.limit) {
		for _, r := range t.cfg.Regions { // a run may cross from one region to the next
			first, end := r.FirstPage(), r.FirstPage()+r.Pages()
			p, q := max(run[0], first), min(run[0]+run[1], end)
			if p >= q {
				continue
			}
			mem := r.Mem[(p-first)<<guest.PageShift : (q-first)<<guest.PageShift]
			if err := unix.Madvise(mem, unix.MADV_DONTNEED); err != nil {
				return fmt.Errorf("%w: drop %d stale pages: %w", uffd.ErrUnavailable, q-p, err)
			}
		}
	}
	return nil
}

// hashPresent hashes the pages the destination holds at the switch,
// without touching a missing page (a read would map the zero page there
// and the fault that must fetch it would never come).
func hashPresent(regions []guest.Region, missing *precopy.Bitmap) *guest.MemHash {
	mh := guest.NewMemHash()
	for _, r := range regions {
		_ = guest.Populated(r, func(first, n uint64) error {
			for p := first; p < first+n; p++ {
				idx := r.FirstPage() + p
				if !missing.Test(idx) {
					mh.Update(idx, r.Mem[p<<guest.PageShift:(p+1)<<guest.PageShift])
				}
			}
			return nil
		})
	}
	return mh
}

// Stats returns a copy of the figures so far.
// The blocked time includes the waits still going on, so a vCPU stuck
// through a link outage shows it while it lasts.
func (t *Target) Stats() TargetStats {
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.stats
	perVCPU := append([]time.Duration(nil), t.vcpuBlock...)
	s.Waiting = make([]time.Duration, len(perVCPU))
	for _, pd := range t.pending {
		for _, w := range pd.waiters {
			d := now.Sub(w.t0)
			s.Blocktime += d
			if v := t.vcpuOf(w.tid); v >= 0 {
				perVCPU[v] += d
				s.Waiting[v] = max(s.Waiting[v], d)
			}
		}
	}
	if h := t.heard.Load(); h != 0 {
		s.LastHeard = time.Unix(0, h)
	}
	s.BlocktimeMs = make([]int64, len(perVCPU))
	for i, d := range perVCPU {
		s.BlocktimeMs[i] = d.Milliseconds()
	}
	return s
}

// vcpuOf is the vCPU index of thread tid, or -1 (no mapping, not a vCPU,
// or out of range).
func (t *Target) vcpuOf(tid uint32) int {
	if t.cfg.VCPUOf == nil {
		return -1
	}
	if v := t.cfg.VCPUOf(tid); v >= 0 && v < len(t.vcpuBlock) {
		return v
	}
	return -1
}

// pageAt is the page index of a faulting address, or false.
func (t *Target) pageAt(addr uintptr) (uint64, bool) {
	for _, r := range t.cfg.Regions {
		b := uintptr(unsafe.Pointer(unsafe.SliceData(r.Mem)))
		if addr >= b && addr < b+uintptr(len(r.Mem)) {
			return r.FirstPage() + uint64(addr-b)>>guest.PageShift, true
		}
	}
	return 0, false
}

func pageAddr(page []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(page))) }

// Run serves faults and installs pages over urgent and bulk until every
// page has arrived (nil: the userfaultfd is closed, the guest owns its
// memory), ctx ends, or the link fails (ErrLink: call Run again with new
// connections; vCPUs that fault meanwhile wait). Not concurrently.
func (t *Target) Run(ctx context.Context, urgent, bulk net.Conn) error {
	t.mu.Lock()
	if t.done {
		t.mu.Unlock()
		return nil
	}
	for _, p := range t.pending {
		p.requested = time.Time{} // a request sent on a lost link may be lost
	}
	t.mu.Unlock()
	w := newFrameWriter(urgent, t.cfg.LinkTimeout)
	if err := t.sendRuns(w); err != nil {
		t.linkDown()
		return err
	}
	t.mu.Lock()
	t.stats.Runs++
	t.stats.LinkDownSince = time.Time{}
	t.mu.Unlock()
	rctx, cancel := context.WithCancel(ctx)
	w.done = rctx.Done()
	ur, br := newFrameReader(urgent, t.cfg.LinkTimeout), newFrameReader(bulk, t.cfg.LinkTimeout)
	ur.done, br.done = rctx.Done(), rctx.Done()
	errs := make(chan error, 3)
	var wg sync.WaitGroup
	for _, f := range []func() error{
		func() error { return t.requests(rctx, w) },
		func() error { return t.receive(rctx, ur, false) },
		func() error { return t.receive(rctx, br, true) },
	} {
		wg.Go(func() {
			if err := f(); err != nil {
				errs <- err
			}
		})
	}
	var err error
	select {
	case err = <-errs:
	case <-ctx.Done():
		err = ctx.Err()
	}
	cancel()
	urgent.SetDeadline(time.Now()) // unblock the readers
	bulk.SetDeadline(time.Now())
	wg.Wait()
	if t.finish() {
		return nil
	}
	if errors.Is(err, errFinished) {
		err = nil
	}
	if err != nil {
		t.linkDown()
	}
	return err
}

// linkDown records when the link was lost (the first failure of a
// spell), for LinkDownSince.
func (t *Target) linkDown() {
	t.mu.Lock()
	if t.stats.LinkDownSince.IsZero() {
		t.stats.LinkDownSince = time.Now()
	}
	t.mu.Unlock()
}

// errFinished is the fault loop's word that it sent Done: Run stops the
// readers and closes the userfaultfd.
var errFinished = errors.New("every page arrived")

// sendRuns tells the source which pages this destination still lacks.
func (t *Target) sendRuns(w *frameWriter) error {
	t.mu.Lock()
	runs := runsOf(t.missing, t.pm.limit)
	t.mu.Unlock()
	return writeRuns(w, runs)
}

// runsOf lists the runs of set pages below limit, as (first, count).
func runsOf(b *precopy.Bitmap, limit uint64) [][2]uint64 {
	var runs [][2]uint64
	for p, ok := b.NextSet(0); ok && p < limit; {
		q := p + 1
		for q < limit && b.Test(q) {
			q++
		}
		runs = append(runs, [2]uint64{p, q - p})
		p, ok = b.NextSet(q)
	}
	return runs
}

// writeRuns writes runs as 'M' frames and the end of them, and flushes.
func writeRuns(w *frameWriter, runs [][2]uint64) error {
	var n [8]byte
	for _, r := range runs {
		binary.LittleEndian.PutUint64(n[:], r[1])
		if err := w.write(frameRun, r[0], n[:]); err != nil {
			return err
		}
	}
	if err := w.write(frameRunsEnd, 0, nil); err != nil {
		return err
	}
	return w.flush()
}

// finish closes the userfaultfd once every page is in, and reports
// whether it did. Unregistering wakes threads faulting on never-touched
// pages; those are zero at the source too (not missing, not populated).
func (t *Target) finish() bool {
	select {
	case <-t.allIn:
	default:
		return false
	}
	t.mu.Lock()
	ready := t.done || t.stats.Digest != ""
	t.mu.Unlock()
	if !ready {
		return false // Done not sent yet: the next run sends it
	}
	t.stopLoop()
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.done && !t.closed {
		for _, r := range t.cfg.Regions {
			t.fd.Unregister(r.Mem)
		}
		t.fd.Close()
	}
	t.done = true
	return true
}

// stopLoop stops the fault loop and waits for it (at most a poll).
func (t *Target) stopLoop() {
	t.mu.Lock()
	select {
	case <-t.loopStop:
	default:
		close(t.loopStop)
	}
	t.mu.Unlock()
	<-t.loopDone
}

// Close stops serving faults. Once every page arrived it only releases
// what Run left. Before that, it must be called only when the guest will
// never run again (lost, or being torn down): it leaves the userfaultfd
// open, so a vCPU still waiting on a missing page keeps waiting instead
// of being handed a zero page, until the process ends.
func (t *Target) Close() {
	t.stopLoop()
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
}
