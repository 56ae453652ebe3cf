package postcopy

import (
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// The push goes on from the page after the latest request: a guest that
// faulted at page r is likely to touch r+1, r+2... next. A fake
// destination asks for page 1500 of 4096 missing ones and watches the
// bulk connection: the pages pushed after the request's reply continue at
// 1501, before the push ever gets there on its own.
func TestPostcopyPushFollowsFaults(t *testing.T) {
	const pages = 4096
	src := []guest.Region{mapRegion(t, 0, pages)}
	for p := range pages {
		src[0].Mem[p*guest.PageSize] = byte(p) | 1 // not zero: full page frames
	}
	s := NewSource(src, guest.Digest{})
	l := newLinks(t)
	l.srcBulk = slowConn{l.srcBulk, 4 << 10, time.Millisecond}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var runErr error
	var wg sync.WaitGroup
	wg.Go(func() { runErr = s.Run(ctx, l.srcUrgent, l.srcBulk) })

	w := newFrameWriter(l.dstUrgent, time.Second)
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], pages)
	w.write(frameRun, 0, n[:])
	w.write(frameRunsEnd, 0, nil)
	w.flush()
	bulk := newFrameReader(l.dstBulk, 5*time.Second)
	first, err := bulk.read()
	if err != nil || first.typ != framePage || first.arg != 0 {
		t.Fatalf("first pushed frame %q %d (%v), want page 0", first.typ, first.arg, err)
	}
	const asked = 1500
	w.write(frameRequest, asked, nil)
	w.flush()
	urgent := newFrameReader(l.dstUrgent, 5*time.Second)
	for {
		f, err := urgent.read()
		if err != nil {
			t.Fatal(err)
		}
		if f.typ == framePage && f.arg == asked {
			break
		}
	}
	// Frames already buffered before the request keep their order; the
	// first jump in the sequence must land right after the request.
	prev := first.arg
	for range pages {
		f, err := bulk.read()
		if err != nil {
			t.Fatal(err)
		}
		if f.arg != prev+1 {
			if f.arg != asked+1 {
				t.Fatalf("the push jumped from %d to %d, want to %d (after the request)", prev, f.arg, asked+1)
			}
			break
		}
		prev = f.arg
		if prev >= asked-1 {
			t.Fatal("the push reached the requested page on its own: the link is too fast for this test")
		}
	}
	cancel()
	wg.Wait()
	if runErr != nil && !errors.Is(runErr, context.Canceled) {
		t.Fatal(runErr)
	}
}
