package precopy

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
)

// LiveSender sends pages of a running guest over a Link, as a migration's
// iterative rounds and a joining secondary's catch-up do. Pages read
// while the guest runs may be torn by a racing write; such a page is dirty
// again and goes again in a later round or in the final, paused capture.
type LiveSender struct {
	Core *Core
	Link Link
	// Limiter caps the wire rate; nil means no cap.
	Limiter *Limiter
	// EpochPages ends an epoch every so many pages, so the receiver's
	// staging stays small; 0 means 1024.
	EpochPages int
	// Window is how many epochs may be sent and not yet acknowledged
	// before sending waits; 0 means 2. It keeps the bytes queued in
	// socket buffers small, so the figures stay honest and a final send
	// never waits behind a backlog.
	Window int
	// OnPages, if set, is told after every batch how many pages went and
	// how many zero pages round 0 skipped.
	OnPages func(sent, zero uint64)
	// RoundLimit, if set, ends a SendDirty round after this long, leaving
	// the rest in the Bitmap: on a slow link a round that runs for tens
	// of seconds starves the convergence decisions (throttle steps come
	// once per round or two) and blurs the dirty-rate figure.
	RoundLimit time.Duration
	// KeepDisk stops SendAll from asking the next capture for the whole
	// disk (guest.DiskImage). An FT catch-up leaves it false: the
	// replica's disk copy is of unknown age, and only the whole disk
	// makes it the primary's. A migration sets it: its destination's disk
	// is the caller's to provide, and a whole-disk read would land in its
	// downtime.
	KeepDisk bool
	// Stop, if set, is asked after every batch whether the round must
	// end now (a switch to post-copy was asked for: a full pass of a
	// large guest lasts minutes). The pages not sent stay in (SendDirty)
	// or are put into (SendAll) the Bitmap. Called on the sending
	// goroutine.
	Stop func() bool
	// Lazy, if set, is the guest's dirty log started with DiscardDirty:
	// SendAll write-protects each piece of memory (TrackDirty) just
	// before reading it, so a page the guest rewrites before round 0
	// reaches it costs no fault. SendAll clears it when done: from then
	// on every page is tracked.
	Lazy guest.LazyDirtyLog

	epoch   atomic.Uint64 // last epoch number used; read by other goroutines
	inEpoch int           // pages in the open epoch
	snap    []byte        // stable copies of live pages
}

// liveBatch is how many pages a live round reads and sends at a time per
// encoder: one RAM section of checkpoint.DefaultBatchPages, 4 MiB, so the
// stored pages of a section go to the socket in one write.
const liveBatch = checkpoint.DefaultBatchPages

// batchPages is how many pages go to the Writer at a time: a section's
// worth for each of its encoders; on a capped link limitedBatch, since
// the limiter is charged once per batch and a 4 MiB-per-encoder batch
// would leave as a burst of seconds at 100 Mbit/s (and a round's limits
// are checked per batch too).
func (s *LiveSender) batchPages() int {
	if s.Limiter != nil {
		return limitedBatch
	}
	return liveBatch * s.Link.Writer().Encoders()
}

// limitedBatch is the batch on a capped link: 1 MiB, about 80 ms at
// 100 Mbit/s.
const limitedBatch = 256

// SetEpoch sets the last epoch number used; the next epoch is n+1.
func (s *LiveSender) SetEpoch(n uint64) { s.epoch.Store(n) }

// Epoch is the last epoch number used. Safe from any goroutine.
func (s *LiveSender) Epoch() uint64 { return s.epoch.Load() }

// EndEpoch closes the current epoch, flushes the link and returns the
// epoch's number.
func (s *LiveSender) EndEpoch() (uint64, error) {
	e := s.epoch.Add(1)
	s.inEpoch = 0
	if _, err := s.Link.Writer().EndEpoch(e); err != nil {
		return 0, fmt.Errorf("end epoch %d: %w", e, err)
	}
	return e, s.Link.Flush()
}

func (s *LiveSender) epochPages() int {
	if s.EpochPages > 0 {
		return s.EpochPages
	}
	return 1024
}

// endLiveEpoch ends the open epoch if it holds pages, then waits while
// more than Window epochs are unacknowledged.
func (s *LiveSender) endLiveEpoch(ctx context.Context) error {
	if s.inEpoch == 0 {
		return nil
	}
	e, err := s.EndEpoch()
	if err != nil {
		return err
	}
	w := uint64(s.Window)
	if w == 0 {
		w = 2
	}
	if e > w {
		_, err = s.Link.WaitAck(ctx, e-w, false)
	}
	return err
}

// Drain waits until the receiver has acknowledged every epoch sent.
func (s *LiveSender) Drain(ctx context.Context) error {
	e := s.epoch.Load()
	if e == 0 {
		return nil
	}
	_, err := s.Link.WaitAck(ctx, e, false)
	return err
}

// errStopped ends SendAll's walk when Stop said so.
var errStopped = errors.New("precopy: round stopped")

// stopped asks Stop.
func (s *LiveSender) stopped() bool { return s.Stop != nil && s.Stop() }

// SendAll is round 0: every non-zero page of guest memory. The receiver's
// memory starts zero, so zero pages are skipped, and pages the host never
// populated (guest.Populated) are not even read. It ends its last epoch.
// Unless KeepDisk, the next Capture ships the whole disk (Core.ResyncDisk).
// Stopped early, it marks every page it did not reach dirty.
func (s *LiveSender) SendAll(ctx context.Context) (uint64, error) {
	if !s.KeepDisk {
		s.Core.ResyncDisk()
	}
	f := &fullPass{s: s, ctx: ctx, batch: make([]checkpoint.Page, 0, s.batchPages())}
	w := s.Link.Writer()
	w.SkipCacheBelow(s.roundZeroCacheFloor())
	defer w.SkipCacheBelow(0)
	// Lazy tracking is for one pass; even a failed one leaves every page
	// to the next SyncDirty (untracked ones are reported conservatively).
	defer func() { s.Lazy = nil }()
	regions := s.Core.G.Regions()
	for i, r := range regions {
		// Pages the host never populated are zero without being read:
		// cost follows resident memory, not guest size.
		next := uint64(0)
		err := guest.Populated(r, func(first, n uint64) error {
			f.zero += first - next
			next = first + n
			return f.run(regions, i, first, n)
		})
		if errors.Is(err, errStopped) {
			return f.sent, s.endLiveEpoch(ctx)
		}
		if err != nil {
			return f.sent, err
		}
		f.zero += r.Pages() - next
		if err := ctx.Err(); err != nil {
			return f.sent, err
		}
	}
	if err := f.flush(); err != nil {
		return f.sent, err
	}
	if f.zero > 0 && s.OnPages != nil {
		s.OnPages(0, f.zero)
	}
	return f.sent, s.endLiveEpoch(ctx)
}

// fullPass is one SendAll's state: the batch being filled, the pages
// sent, and the zero pages counted since the last report.
type fullPass struct {
	s          *LiveSender
	ctx        context.Context
	batch      []checkpoint.Page
	sent, zero uint64
}

// flush sends the batch, ending the live epoch once it holds enough.
func (f *fullPass) flush() error {
	s := f.s
	if len(f.batch) == 0 {
		return nil
	}
	if err := s.sendBatch(f.ctx, f.batch); err != nil {
		return err
	}
	f.sent += uint64(len(f.batch))
	s.inEpoch += len(f.batch)
	if s.OnPages != nil {
		s.OnPages(uint64(len(f.batch)), f.zero)
	}
	f.zero = 0
	f.batch = f.batch[:0]
	if s.inEpoch >= s.epochPages() {
		return s.endLiveEpoch(f.ctx)
	}
	return nil
}

// run sends the non-zero pages of the populated run [first, first+n) of
// regions[i], a batch at a time, write-protecting each batch's pages just
// before reading them when the dirty log is lazy. Stop is asked after
// each batch sent: errStopped, with every page not reached marked dirty.
func (f *fullPass) run(regions []guest.Region, i int, first, n uint64) error {
	s, r, step := f.s, regions[i], uint64(cap(f.batch))
	for c := first; c < first+n; c += step {
		end := min(c+step, first+n)
		if s.Lazy != nil {
			if err := s.Lazy.TrackDirty(r.FirstPage()+c, end-c); err != nil {
				return fmt.Errorf("start dirty tracking: %w", err)
			}
		}
		for p := c; p < end; p++ {
			page := r.Mem[p<<guest.PageShift : (p+1)<<guest.PageShift]
			if guest.IsZeroPage(page) {
				f.zero++
				continue
			}
			f.batch = append(f.batch, checkpoint.Page{Index: r.FirstPage() + p, Data: page})
			if len(f.batch) < cap(f.batch) {
				continue
			}
			if err := f.flush(); err != nil {
				return err
			}
			if s.stopped() {
				s.markRest(regions[i:], p+1)
				return errStopped
			}
		}
	}
	return f.ctx.Err()
}

// roundZeroCacheFloor is the page index below which round 0 keeps its
// pages out of the Writer's delta cache. The cache is direct-mapped by
// index, so of a pass in page order it keeps only the last CachePages
// pages: a page CachePages before the last populated one has its slot
// taken later in the pass (exactly so when the populated pages are
// contiguous), and copying it in is wasted. On a 512 MiB working set and
// the 64 MiB default cache, that is seven copies of every eight. A cache
// that covers the guest (a capped link's) keeps every page.
func (s *LiveSender) roundZeroCacheFloor() uint64 {
	slots := s.Link.Writer().CachePages()
	if slots == 0 {
		return 0
	}
	var end uint64 // one past the last populated page
	for _, r := range s.Core.G.Regions() {
		_ = guest.Populated(r, func(first, n uint64) error {
			end = max(end, r.FirstPage()+first+n)
			return nil
		})
	}
	if end <= slots {
		return 0
	}
	return end - slots
}

// SendDirty sends the pages the Bitmap holds and ends its last epoch.
func (s *LiveSender) SendDirty(ctx context.Context) (uint64, error) {
	var sent uint64
	idx := make([]uint64, s.batchPages())
	batch := make([]checkpoint.Page, 0, len(idx))
	var deadline time.Time
	if s.RoundLimit > 0 {
		deadline = s.Core.clock().Now().Add(s.RoundLimit)
	}
	for from := uint64(0); ; {
		n, next := s.Core.Dirty.TakeBatch(idx, from)
		batch = batch[:0]
		for _, p := range idx[:n] {
			if data := s.Core.Page(p); data != nil {
				batch = append(batch, checkpoint.Page{Index: p, Data: data})
			}
		}
		if len(batch) > 0 {
			if err := s.sendBatch(ctx, batch); err != nil {
				return sent, err
			}
			sent += uint64(len(batch))
			s.inEpoch += len(batch)
			if s.OnPages != nil {
				s.OnPages(uint64(len(batch)), 0)
			}
		}
		if s.inEpoch >= s.epochPages() {
			if err := s.endLiveEpoch(ctx); err != nil {
				return sent, err
			}
		}
		if n < len(idx) || (!deadline.IsZero() && s.Core.clock().Now().After(deadline)) || s.stopped() {
			break
		}
		from = next
	}
	return sent, s.endLiveEpoch(ctx)
}

// markRest marks dirty the pages of regions[0] from its page off on and
// every page of the regions after it: those a stopped full pass did not
// send. Pages the host never populated are left out, as SendAll leaves
// them out: they are zero here and at the receiver, whose memory starts
// zero; a later write to one is in the dirty log (synth logs every
// store; under KVM a never-populated page has no writable mapping, so
// the guest's first write to it faults and is logged). Owing them cost
// a post-copy switch of a sparse guest its whole size: every hole a
// missing page, dropped at the destination, faulted for and served.
func (s *LiveSender) markRest(regions []guest.Region, off uint64) {
	for i, r := range regions {
		from := uint64(0)
		if i == 0 {
			from = min(off, r.Pages())
		}
		rest := r.Sub(from, r.Pages()-from)
		first := rest.FirstPage()
		mark := func(p, n uint64) error {
			for q := p; q < p+n; q++ {
				s.Core.Dirty.Set(first + q)
			}
			return nil
		}
		if err := guest.Populated(rest, mark); err != nil {
			_ = mark(0, rest.Pages()) // the scan failed: owe every page
		}
	}
}

// sendBatch sends pages read from live guest memory. The Writer reads a
// page several times (zero test, digest, delta, cache), so each page is
// first copied once: what is sent, hashed and cached is one version.
func (s *LiveSender) sendBatch(ctx context.Context, batch []checkpoint.Page) error {
	if need := len(batch) * guest.PageSize; len(s.snap) < need {
		s.snap = make([]byte, need)
	}
	for i := range batch {
		dst := s.snap[i*guest.PageSize : (i+1)*guest.PageSize]
		copy(dst, batch[i].Data)
		batch[i].Data = dst
	}
	before := s.Link.BytesSent()
	if err := s.Link.Writer().WritePages(batch); err != nil {
		return fmt.Errorf("send pages: %w", err)
	}
	if s.Limiter != nil {
		if err := s.Limiter.Wait(ctx, int(s.Link.BytesSent()-before)); err != nil {
			return err
		}
	}
	return nil
}
