package synth

import (
	"bytes"
	"context"
	"math/bits"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// bitmap is a test DirtyLog.
type bitmap struct{ w []uint64 }

func newBitmap(pages uint64) *bitmap { return &bitmap{w: make([]uint64, (pages+63)/64)} }

func (b *bitmap) OrWords(first uint64, ws []uint64) uint64 {
	var n uint64
	for i, w := range ws {
		j := first/64 + uint64(i)
		n += uint64(bits.OnesCount64(w &^ b.w[j]))
		b.w[j] |= w
	}
	return n
}

func (b *bitmap) has(p uint64) bool { return b.w[p/64]&(1<<(p%64)) != 0 }

func (b *bitmap) count() (n int) {
	for _, w := range b.w {
		n += bits.OnesCount64(w)
	}
	return n
}

// output collects a guest's console lines.
type output struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	lines []string
}

func (o *output) sink(p []byte) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.buf.Write(p)
	for {
		i := bytes.IndexByte(o.buf.Bytes(), '\n')
		if i < 0 {
			return
		}
		o.lines = append(o.lines, string(o.buf.Next(i + 1)[:i]))
	}
}

func (o *output) take() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	l := o.lines
	o.lines = nil
	return l
}

// waitLines waits until n lines have arrived and takes them.
func (o *output) waitLines(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		o.mu.Lock()
		got := len(o.lines)
		o.mu.Unlock()
		if got >= n {
			return o.take()
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("waited 10s for %d lines, have %v", n, o.take())
	return nil
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func mustNew(t *testing.T, cfg guest.Config) *Guest {
	t.Helper()
	g, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

func mustPause(t *testing.T, g *Guest) {
	t.Helper()
	if _, err := g.Pause(ctx(t)); err != nil {
		t.Fatal(err)
	}
}

func mustResume(t *testing.T, g *Guest) {
	t.Helper()
	if _, err := g.Resume(); err != nil {
		t.Fatal(err)
	}
}

// image is a captured guest: non-zero pages and state.
type image struct {
	pages map[uint64][]byte
	state guest.MachineState
}

// capture copies a paused guest's non-zero pages and state.
func capture(t *testing.T, g *Guest) image {
	t.Helper()
	img := image{pages: map[uint64][]byte{}}
	for _, r := range g.Regions() {
		for p := uint64(0); p < r.Pages(); p++ {
			pg := r.Mem[p<<guest.PageShift : (p+1)<<guest.PageShift]
			if !guest.IsZeroPage(pg) {
				img.pages[r.FirstPage()+p] = append([]byte(nil), pg...)
			}
		}
	}
	st, err := g.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	img.state = st
	return img
}

func (img image) restore(t *testing.T, cfg guest.Config) *Guest {
	t.Helper()
	g, err := Restore(cfg, func(rs []guest.Region) error {
		for p, data := range img.pages {
			copy(rs[0].Mem[p<<guest.PageShift:], data)
		}
		return nil
	}, img.state)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}
