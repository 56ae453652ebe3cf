package postcopy

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// silentLink forwards bytes between two connections until cut, then
// holds them: the link goes silent (no FIN, no RST), as a pulled cable or
// a partition does.
type silentLink struct {
	cut  atomic.Bool
	stop chan struct{}
	wg   sync.WaitGroup
}

// forward copies a to b and b to a through the gate.
func (s *silentLink) forward(a, b net.Conn) {
	pipe := func(dst, src net.Conn) {
		defer s.wg.Done()
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if s.cut.Load() {
				<-s.stop // hold everything from now on
				return
			}
			if n > 0 {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	s.wg.Add(2)
	go pipe(b, a)
	go pipe(a, b)
}

// silentLinks are links whose two connections both pass through one
// silentLink.
func silentLinks(t *testing.T) (links, *silentLink) {
	s := &silentLink{stop: make(chan struct{})}
	src, dst := newLinks(t), newLinks(t)
	s.forward(src.dstUrgent, dst.srcUrgent)
	s.forward(src.dstBulk, dst.srcBulk)
	t.Cleanup(func() {
		close(s.stop)
		for _, c := range []net.Conn{src.dstUrgent, src.dstBulk, dst.srcUrgent, dst.srcBulk} {
			c.Close()
		}
		s.wg.Wait()
	})
	return links{srcUrgent: src.srcUrgent, srcBulk: src.srcBulk, dstUrgent: dst.dstUrgent, dstBulk: dst.dstBulk}, s
}

// A link that goes silent mid-way (nothing closes) is noticed by both
// sides within the link timeout, through the heartbeats, and a run over
// a new link completes.
func TestPostcopySilentLinkDetected(t *testing.T) {
	const timeout = time.Second
	s := newScene(t, 2048, 9)
	tg, err := NewTarget(TargetConfig{Regions: s.dst, Missing: s.missing, State: s.state, LinkTimeout: timeout})
	if err != nil {
		t.Skip(err)
	}
	defer tg.Close()
	src := NewSource(s.src, s.digest)
	src.LinkTimeout = timeout
	l, gate := silentLinks(t)
	l.srcBulk = slowConn{l.srcBulk, 16 << 10, 5 * time.Millisecond}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var cutAt atomic.Int64
	go func() {
		time.Sleep(300 * time.Millisecond)
		cutAt.Store(time.Now().UnixNano())
		gate.cut.Store(true)
	}()
	t0 := time.Now()
	srcErr, dstErr := runBoth(ctx, src, tg, l)
	took := time.Since(t0)
	if !errors.Is(srcErr, ErrLink) || !errors.Is(dstErr, ErrLink) {
		t.Fatalf("after the link went silent: source %v, destination %v; want ErrLink on both", srcErr, dstErr)
	}
	if took > 300*time.Millisecond+3*timeout {
		t.Fatalf("the silent link took %v to notice, timeout %v", took, timeout)
	}
	// The destination knows when the source really went: its last frame,
	// at the cut (the push flows until then), a timeout before the link
	// was declared down.
	cut := time.Unix(0, cutAt.Load())
	if st := tg.Stats(); st.LastHeard.Before(cut.Add(-HeartbeatInterval)) || st.LastHeard.After(cut.Add(100*time.Millisecond)) ||
		st.LinkDownSince.Sub(st.LastHeard) < timeout/2 {
		t.Fatalf("cut at %v: last heard %v, link down since %v", cut, st.LastHeard, st.LinkDownSince)
	}
	srcErr, dstErr = runBoth(ctx, src, tg, newLinks(t))
	if srcErr != nil || dstErr != nil {
		t.Fatalf("run over a new link: source %v, destination %v", srcErr, dstErr)
	}
	sameMemory(t, s)
	t.Logf("silent link noticed after %v (cut at 300ms, timeout %v)", took.Round(time.Millisecond), timeout)
}

// A quiet link is not a lost one: with no vCPU faulting, the urgent
// connection carries only heartbeats for longer than the link timeout
// while the push takes its time, and the run completes.
func TestPostcopyQuietLinkKept(t *testing.T) {
	const timeout = time.Second
	s := newScene(t, 2048, 11)
	tg, err := NewTarget(TargetConfig{Regions: s.dst, Missing: s.missing, State: s.state, LinkTimeout: timeout})
	if err != nil {
		t.Skip(err)
	}
	defer tg.Close()
	src := NewSource(s.src, s.digest)
	src.LinkTimeout = timeout
	l := newLinks(t)
	l.srcBulk = slowConn{l.srcBulk, 8 << 10, 5 * time.Millisecond} // about 3 s for the push
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t0 := time.Now()
	srcErr, dstErr := runBoth(ctx, src, tg, l)
	if srcErr != nil || dstErr != nil {
		t.Fatalf("source %v, destination %v after %v", srcErr, dstErr, time.Since(t0))
	}
	if took := time.Since(t0); took < 2*timeout {
		t.Fatalf("the push took %v: too fast to show the urgent link idle beyond the %v timeout", took, timeout)
	}
	if st := tg.Stats(); st.Requests != 0 || st.Runs != 1 {
		t.Fatalf("stats %+v: want one run and no requests", st)
	}
}

// TestEndedRunArmsNoFreshDeadline: a run ends by closing its done channel
// and then setting its connections' deadlines to now. A frame written
// just after that arms a fresh deadline, which would undo the run's and
// keep the end waiting a whole link timeout on a peer that reads
// nothing; it must see the run's end instead.
func TestEndedRunArmsNoFreshDeadline(t *testing.T) {
	a, b := net.Pipe() // nobody reads b: a write blocks until its deadline
	defer a.Close()
	defer b.Close()
	done := make(chan struct{})
	close(done)
	w := newFrameWriter(a, 5*time.Second)
	w.done = done
	r := newFrameReader(a, 5*time.Second)
	r.done = done
	start := time.Now()
	errW := w.write(frameBeat, 0, nil)
	if errW == nil {
		errW = w.flush()
	}
	_, errR := r.read()
	if took := time.Since(start); took > time.Second {
		t.Fatalf("an ended run's I/O waited %v", took)
	}
	for _, err := range []error{errW, errR} {
		if err == nil {
			t.Fatalf("I/O after the run ended succeeded")
		}
	}
}
