package postcopy

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/uffd"
	"github.com/tandemvm/tandem/precopy"
)

// slowConn writes in small pieces with a pause after each: a slow link.
type slowConn struct {
	net.Conn
	piece int
	pause time.Duration
}

func (c slowConn) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), c.piece)
		m, err := c.Conn.Write(p[:k])
		n += m
		if err != nil {
			return n, err
		}
		p = p[k:]
		time.Sleep(c.pause)
	}
	return n, nil
}

// someMissing returns a page the destination still lacks, and its memory
// on both sides.
func someMissing(t *testing.T, s *scene, tg *Target) (uint64, []byte, []byte) {
	t.Helper()
	tg.mu.Lock()
	p, ok := tg.missing.NextSet(0)
	tg.mu.Unlock()
	if !ok {
		t.Fatal("nothing missing any more: the link was not slow enough")
	}
	pm, dm := newPageMap(s.src), newPageMap(s.dst)
	return p, pm.page(p), dm.page(p)
}

// The link drops mid-way: both sides end with ErrLink, a vCPU that faults
// meanwhile waits (it is not handed a zero page), and a second run over
// new connections completes with the right content and digest.
func TestPostcopyLinkDropResumes(t *testing.T) {
	s := newScene(t, 2048, 3)
	// The reader below is vCPU 0: its thread is the one locked to it.
	var vcpu0 atomic.Int64
	tg, err := NewTarget(TargetConfig{Regions: s.dst, Missing: s.missing, State: s.state, RetryAfter: 200 * time.Millisecond,
		VCPUs: 1, VCPUOf: func(tid uint32) int {
			if int64(tid) == vcpu0.Load() {
				return 0
			}
			return -1
		}})
	if errors.Is(err, uffd.ErrUnavailable) {
		t.Skipf("userfaultfd unavailable: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tg.Close)
	src := NewSource(s.src, s.digest)
	l := newLinks(t)
	l.srcBulk = slowConn{l.srcBulk, 16 << 10, 5 * time.Millisecond}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() {
		time.Sleep(300 * time.Millisecond)
		l.srcUrgent.Close() // the link drops
		l.srcBulk.Close()
	}()
	srcErr, dstErr := runBoth(ctx, src, tg, l)
	if !errors.Is(srcErr, ErrLink) || !errors.Is(dstErr, ErrLink) {
		t.Fatalf("after the drop: source %v, destination %v; want ErrLink on both", srcErr, dstErr)
	}
	p, want, got := someMissing(t, s, tg)
	read := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		vcpu0.Store(int64(unix.Gettid()))
		read <- uffd.Populate(got)
	}()
	select {
	case err := <-read:
		t.Fatalf("page %d was read while the link was down (err %v)", p, err)
	case <-time.After(300 * time.Millisecond):
	}
	// The wait shows in the blocked time while it lasts, and names the
	// vCPU that waits.
	if st := tg.Stats(); !st.Active || st.Remaining == 0 || st.LinkDownSince.IsZero() || st.Runs != 1 || st.Blocktime < 250*time.Millisecond ||
		len(st.Waiting) != 1 || st.Waiting[0] < 250*time.Millisecond || st.BlocktimeMs[0] < 250 ||
		st.LastHeard.IsZero() || st.LastHeard.After(st.LinkDownSince) {
		t.Fatalf("stats while down: %+v", st)
	}
	srcErr, dstErr = runBoth(ctx, src, tg, newLinks(t))
	if srcErr != nil || dstErr != nil {
		t.Fatalf("resumed run: source %v, destination %v", srcErr, dstErr)
	}
	if err := <-read; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("page %d differs after the resume", p)
	}
	sameMemory(t, s)
	if st, ss := tg.Stats(), src.Stats(); st.Digest != s.digest.String() || ss.Runs != 2 || st.Runs != 2 || !st.LinkDownSince.IsZero() || st.Blocktime < 300*time.Millisecond ||
		st.Waiting[0] != 0 {
		t.Fatalf("target %+v source %+v", st, ss)
	}
}

// A destination whose held pages differ from the source's is caught by
// the switch-over digest.
func TestPostcopyDigestMismatch(t *testing.T) {
	s := newScene(t, 256, 5)
	dm := newPageMap(s.dst)
	for p := uint64(0); p < dm.limit; p++ {
		if pg := dm.page(p); pg != nil && !s.missing.Test(p) {
			pg[100] ^= 1 // a page the precopy rounds got wrong
			break
		}
	}
	tg := newTarget(t, s, 0)
	src := NewSource(s.src, s.digest)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srcErr, _ := runBoth(ctx, src, tg, newLinks(t))
	if !errors.Is(srcErr, ErrDigestMismatch) {
		t.Fatalf("source: %v, want ErrDigestMismatch", srcErr)
	}
}

// Frames from a peer are bounded: a missing run or a request beyond the
// guest, a page beyond it, or an unknown frame end the run with
// ErrProtocol, and nothing is written to memory.
func TestPostcopyBadFrames(t *testing.T) {
	s := newScene(t, 64, 7)
	limit := newPageMap(s.src).limit
	var n [8]byte
	for _, c := range []struct {
		name  string
		write func(w *frameWriter)
	}{
		{"run beyond memory", func(w *frameWriter) { binary.LittleEndian.PutUint64(n[:], 2); w.write(frameRun, limit-1, n[:]) }},
		{"huge run", func(w *frameWriter) { binary.LittleEndian.PutUint64(n[:], ^uint64(0)); w.write(frameRun, 0, n[:]) }},
		{"run in the gap", func(w *frameWriter) { binary.LittleEndian.PutUint64(n[:], 1); w.write(frameRun, 64, n[:]) }},
		{"request beyond memory", func(w *frameWriter) { w.write(frameRunsEnd, 0, nil); w.write(frameRequest, limit, nil) }},
		{"unknown frame", func(w *frameWriter) { w.write('x', 0, nil) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newLinks(t)
			w := newFrameWriter(l.dstUrgent, time.Second)
			c.write(w)
			w.flush()
			err := NewSource(s.src, s.digest).Run(context.Background(), l.srcUrgent, l.srcBulk)
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("source: %v, want ErrProtocol", err)
			}
		})
	}
	t.Run("page beyond memory", func(t *testing.T) {
		tg := newTarget(t, s, 0)
		l := newLinks(t)
		w := newFrameWriter(l.srcBulk, time.Second)
		w.write(framePage, limit+5, make([]byte, guest.PageSize))
		w.flush()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := tg.Run(ctx, l.dstUrgent, l.dstBulk); !errors.Is(err, ErrProtocol) {
			t.Fatalf("target: %v, want ErrProtocol", err)
		}
		if st := tg.Stats(); st.Received != 0 {
			t.Fatalf("installed %d pages from a bad peer", st.Received)
		}
		// The guest is not resumed in this test; the target still owes
		// pages, so it is served to the end for the leak check.
		if err := runBothNew(t, s, tg); err != nil {
			t.Fatal(err)
		}
	})
}

func runBothNew(t *testing.T, s *scene, tg *Target) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, b := runBoth(ctx, NewSource(s.src, s.digest), tg, newLinks(t))
	return errors.Join(a, b)
}

// Memory userfaultfd cannot take (here a private mapping of a file) is
// refused with ErrUnavailable, by the check a destination makes first
// (Available) and by NewTarget before anything of it changed: the
// migration can stay precopy-only.
func TestPostcopyTargetRefusesFileMemory(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "mem"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(4 * guest.PageSize); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, 4*guest.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	mem[1*guest.PageSize] = 0x33 // a page the precopy rounds sent
	missing := precopy.NewBitmap(4)
	missing.Set(1)
	fileRegion := []guest.Region{{Mem: mem}}
	if err := Available(fileRegion); !errors.Is(err, uffd.ErrUnavailable) {
		t.Fatalf("Available on file memory: %v, want ErrUnavailable", err)
	}
	if err := Available([]guest.Region{mapRegion(t, 0, 4)}); err != nil {
		t.Fatalf("Available on anonymous memory: %v", err)
	}
	_, err = NewTarget(TargetConfig{Regions: fileRegion, Missing: missing})
	if !errors.Is(err, uffd.ErrUnavailable) {
		t.Fatalf("NewTarget on file memory: %v, want ErrUnavailable", err)
	}
	if mem[1*guest.PageSize] != 0x33 {
		t.Fatal("a refused NewTarget dropped a page")
	}
	t.Logf("refused with: %v", err)
}
