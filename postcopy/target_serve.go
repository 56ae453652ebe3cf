package postcopy

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/uffd"
)

// faultPoll bounds one wait for faults, so the loop notices its stop in
// time; requestTick is how often a run looks for requests to repeat.
const (
	faultPoll   = 20 * time.Millisecond
	requestTick = 50 * time.Millisecond
)

// faultLoop reads the userfaultfd for the Target's whole life, links up
// or down: a fault on a page the source owes becomes a pending request
// (with the time it started, for the blocked time), any other is
// resolved at once. It ends when stop closes.
func (t *Target) faultLoop() {
	defer close(t.loopDone)
	var buf []uffd.Fault
	for {
		select {
		case <-t.loopStop:
			return
		default:
		}
		faults, err := t.fd.ReadFaults(buf[:0], faultPoll)
		buf = faults // reused by the next poll
		if err == nil {
			now := time.Now()
			for _, f := range faults {
				if err = t.onFault(f, now); err != nil {
					break
				}
			}
		}
		if err != nil {
			t.mu.Lock()
			t.loopErr = err
			t.mu.Unlock()
			t.kickRequests()
			return
		}
	}
}

func (t *Target) kickRequests() {
	select {
	case t.kick <- struct{}{}:
	default:
	}
}

// requests owns the urgent writer during a run: requests as faults come,
// repeats of unanswered ones, heartbeats, and Done at the end.
func (t *Target) requests(ctx context.Context, w *frameWriter) error {
	tick := time.NewTicker(requestTick)
	defer tick.Stop()
	var reqs []uint64
	lastBeat := time.Now()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.allIn:
			return t.sendDone(w)
		case <-t.kick:
		case <-tick.C:
		}
		t.mu.Lock()
		err := t.loopErr
		t.mu.Unlock()
		if err != nil {
			return fmt.Errorf("postcopy: serving faults: %w", err)
		}
		now := time.Now()
		reqs = t.dueRequests(now, reqs[:0])
		for _, p := range reqs {
			if err := w.write(frameRequest, p, nil); err != nil {
				return err
			}
		}
		beat := now.Sub(lastBeat) >= HeartbeatInterval
		if beat {
			if err := w.write(frameBeat, 0, nil); err != nil {
				return err
			}
			lastBeat = now
		}
		if len(reqs) > 0 || beat {
			if err := w.flush(); err != nil {
				return err
			}
		}
	}
}

// onFault handles one fault: a page the source owes is requested (once;
// dueRequests repeats it), any other page is zero at the source and is
// mapped at once.
func (t *Target) onFault(f uffd.Fault, now time.Time) error {
	p, ok := t.pageAt(f.Addr)
	if !ok {
		return fmt.Errorf("postcopy: fault at %#x outside guest memory", f.Addr)
	}
	t.mu.Lock()
	if !t.missing.Test(p) {
		t.mu.Unlock()
		// Never populated and not owed (or it arrived just now, in which
		// case the zero page is refused and the waiters were woken by
		// the copy; waking again is harmless).
		err := t.fd.Zero(f.Addr)
		if errors.Is(err, uffd.ErrExists) {
			err = t.fd.Wake(f.Addr)
		}
		return err
	}
	pd := t.pending[p]
	if pd == nil {
		pd = &pending{}
		t.pending[p] = pd
		t.stats.Requests++
	}
	pd.waiters = append(pd.waiters, waiter{tid: f.TID, t0: now})
	t.stats.Faults++
	t.mu.Unlock()
	t.kickRequests()
	return nil
}

// dueRequests appends the pages whose request is not sent yet, or was
// sent RetryAfter ago and not answered, and marks them sent now.
func (t *Target) dueRequests(now time.Time, reqs []uint64) []uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	for p, pd := range t.pending {
		if pd.requested.IsZero() || now.Sub(pd.requested) >= t.cfg.RetryAfter {
			pd.requested = now
			reqs = append(reqs, p)
		}
	}
	return reqs
}

// sendDone sends the switch-over digest: the pages held at the switch and
// every page as it arrived, with the machine state.
func (t *Target) sendDone(w *frameWriter) error {
	t.mu.Lock()
	d := guest.CombineDigest(t.hash.Sum(), t.cfg.State)
	t.mu.Unlock()
	if err := w.write(frameDone, 0, d[:]); err != nil {
		return err
	}
	if err := w.flush(); err != nil {
		return err
	}
	t.mu.Lock()
	t.stats.Digest = d.String()
	t.mu.Unlock()
	return errFinished
}

// receive installs the pages arriving on one connection. The bulk
// connection ends with End; the urgent one carries heartbeats too.
func (t *Target) receive(ctx context.Context, r *frameReader, bulk bool) error {
	for {
		f, err := r.read()
		if err == nil {
			t.heard.Store(time.Now().UnixNano())
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		switch {
		case f.typ == framePage || f.typ == frameZero:
			if err := t.install(f.arg, f.data); err != nil {
				return err
			}
		case f.typ == frameBeat && !bulk:
		case f.typ == frameEnd && bulk:
			return nil
		default:
			return fmt.Errorf("%w: frame %q on the %s connection", ErrProtocol, f.typ, connName(bulk))
		}
	}
}

func connName(bulk bool) string {
	if bulk {
		return "bulk"
	}
	return "urgent"
}

// install maps page index with data (nil: zero) if it is still missing,
// wakes its waiters and accounts their blocked time.
func (t *Target) install(index uint64, data []byte) error {
	if index >= t.pm.limit {
		return fmt.Errorf("%w: page %d beyond memory (%d pages)", ErrProtocol, index, t.pm.limit)
	}
	mem := t.pm.page(index)
	if mem == nil {
		return fmt.Errorf("%w: page %d in no region", ErrProtocol, index)
	}
	t.mu.Lock()
	owed := t.missing.Test(index)
	t.mu.Unlock()
	if !owed {
		return nil // sent twice (urgent and bulk), or a stray: the first copy stands
	}
	var err error
	if data == nil {
		err = t.fd.Zero(pageAddr(mem))
	} else {
		err = t.fd.Copy(pageAddr(mem), data)
	}
	if err != nil && !errors.Is(err, uffd.ErrExists) {
		return fmt.Errorf("postcopy: install page %d: %w", index, err)
	}
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.missing.TestAndClear(index) {
		return nil // the other connection installed it meanwhile
	}
	if data != nil {
		t.hash.Update(index, data)
	}
	t.stats.Received++
	t.stats.Remaining--
	if pd := t.pending[index]; pd != nil {
		for _, w := range pd.waiters {
			t.account(w, now)
		}
		delete(t.pending, index)
	}
	if t.stats.Remaining == 0 {
		t.stats.Active = false
		close(t.allIn)
	}
	return nil
}

// account adds one wait to the blocked time. Preconditions: t.mu held.
func (t *Target) account(w waiter, now time.Time) {
	d := now.Sub(w.t0)
	t.stats.Blocktime += d
	if v := t.vcpuOf(w.tid); v >= 0 {
		t.vcpuBlock[v] += d
	}
}
