package kvm

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// skipWithoutKVM skips a test that needs a usable /dev/kvm and the image.
func skipWithoutKVM(t testing.TB) {
	t.Helper()
	if err := Available(); err != nil {
		t.Skipf("no usable KVM: %v", err)
	}
	if _, err := DefaultImage(); err != nil {
		t.Skipf("no micro-guest image: %v", err)
	}
}

func kvConfig(mem uint64, vcpus int) guest.Config {
	return guest.Config{Memory: mem, VCPUs: vcpus, Workload: guest.Workload{Kind: guest.WorkloadKV}}
}

// lineReader collects console output and hands out whole lines.
type lineReader struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	lines chan string
}

func newLineReader() *lineReader { return &lineReader{lines: make(chan string, 4096)} }

func (l *lineReader) sink(p []byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	for {
		i := bytes.IndexByte(l.buf.Bytes(), '\n')
		if i < 0 {
			return
		}
		line := string(l.buf.Next(i + 1))
		select {
		case l.lines <- strings.TrimSuffix(line, "\n"):
		default:
		}
	}
}

func (l *lineReader) next(t testing.TB, d time.Duration) string {
	t.Helper()
	select {
	case s := <-l.lines:
		return s
	case <-time.After(d):
		t.Fatalf("no console line within %v", d)
		return ""
	}
}

// ask sends one request and waits for its reply.
func ask(t testing.TB, g *Guest, lr *lineReader, req string) string {
	t.Helper()
	if err := g.Console().Input([]byte(req + "\n")); err != nil {
		t.Fatalf("input %q: %v", req, err)
	}
	return lr.next(t, 10*time.Second)
}

func mustPause(t testing.TB, g *Guest) time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d, err := g.Pause(ctx)
	if err != nil {
		t.Fatalf("pause: %v", err)
	}
	return d
}

func mustResume(t testing.TB, g *Guest) {
	t.Helper()
	if _, err := g.Resume(); err != nil {
		t.Fatalf("resume: %v", err)
	}
}

func expect(t testing.TB, got, want string) {
	t.Helper()
	if got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

// wordLog is a tiny guest.DirtyLog for tests.
type wordLog struct{ words map[uint64]uint64 }

func newWordLog() *wordLog { return &wordLog{words: map[uint64]uint64{}} }

func (w *wordLog) OrWords(first uint64, words []uint64) uint64 {
	if first%64 != 0 {
		panic(fmt.Sprintf("OrWords first %d not a multiple of 64", first))
	}
	var n uint64
	for j, x := range words {
		if x == 0 {
			continue
		}
		k := first/64 + uint64(j)
		old := w.words[k]
		w.words[k] = old | x
		n += uint64(popcount(x &^ old))
	}
	return n
}

func (w *wordLog) has(p uint64) bool { return w.words[p/64]&(1<<(p%64)) != 0 }

func popcount(x uint64) int {
	n := 0
	for ; x != 0; x &= x - 1 {
		n++
	}
	return n
}
