package precopy

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// droppingGuest lets a test say the disk-write log dropped writes.
type droppingGuest struct {
	*synth.Guest
	dropped uint64
}

func (g *droppingGuest) DiskDropped() uint64 { return g.dropped }

// A catch-up (ResyncDisk) and a rise of the dropped-write count each make
// the next capture ship the whole disk, once; other captures ship the
// writes since the last one.
func TestCaptureShipsWholeDiskOnResyncAndDrop(t *testing.T) {
	cfg := guest.Config{Memory: 4 << 20, VCPUs: 1, Disk: filepath.Join(t.TempDir(), "d.img"), Workload: guest.Workload{Kind: guest.WorkloadKV}}
	sg, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer sg.Close()
	g := &droppingGuest{Guest: sg}
	var out bytes.Buffer
	got := make(chan struct{}, 16)
	sg.Console().SetOutput(func(p []byte) { out.Write(p); got <- struct{}{} })
	sg.Resume()
	set := func(i int) {
		t.Helper()
		sg.Console().Input(fmt.Appendf(nil, "c:%d SET k%d v\n", i, i))
		select {
		case <-got:
		case <-time.After(5 * time.Second):
			t.Fatal("no reply")
		}
	}
	core := NewCore(g, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	capture := func() *Capture {
		t.Helper()
		cp, err := core.Capture(ctx, CaptureOptions{FlushBudget: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return cp
	}
	set(1)
	capture() // takes the write log so far
	set(2)
	if cp := capture(); cp.DiskResync != "" || len(cp.Disk) == 0 {
		t.Fatalf("an ordinary capture: resync %q, %d writes", cp.DiskResync, len(cp.Disk))
	}
	size, _ := sg.DiskSize()
	whole := func(cp *Capture, what string) {
		t.Helper()
		if cp.DiskResync == "" {
			t.Fatalf("%s: no whole-disk resync", what)
		}
		var n uint64
		for _, w := range cp.Disk {
			if w.Offset != n {
				t.Fatalf("%s: write at %d, want %d (contiguous from 0)", what, w.Offset, n)
			}
			n += uint64(len(w.Data))
		}
		if n != size || size == 0 {
			t.Fatalf("%s: shipped %d bytes of a %d-byte disk", what, n, size)
		}
	}
	core.ResyncDisk()
	set(3)
	whole(capture(), "after ResyncDisk")
	if cp := capture(); cp.DiskResync != "" {
		t.Fatalf("the resync repeated: %q", cp.DiskResync)
	}
	g.dropped = 7
	whole(capture(), "after dropped writes")
	if cp := capture(); cp.DiskResync != "" {
		t.Fatalf("the drop resync repeated: %q", cp.DiskResync)
	}
	if core.DiskResyncs != 2 {
		t.Fatalf("DiskResyncs %d, want 2", core.DiskResyncs)
	}
}

// A guest without a disk ships no disk writes on a catch-up: a size mark
// would be refused by a receiver as a write for a guest without a disk.
func TestCaptureWithoutDiskShipsNoResync(t *testing.T) {
	sg, err := synth.New(guest.Config{Memory: 4 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		t.Fatal(err)
	}
	defer sg.Close()
	sg.Resume()
	core := NewCore(sg, nil)
	core.ResyncDisk()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cp, err := core.Capture(ctx, CaptureOptions{FlushBudget: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if len(cp.Disk) != 0 || cp.DiskResync != "" {
		t.Fatalf("a diskless guest shipped %d disk writes (resync %q)", len(cp.Disk), cp.DiskResync)
	}
}

// failingDisk fails its next whole-disk read.
type failingDisk struct {
	*synth.Guest
	fail bool
}

func (g *failingDisk) ReadDisk(p []byte, off uint64) error {
	if g.fail {
		g.fail = false
		return fmt.Errorf("injected read failure")
	}
	return g.Guest.ReadDisk(p, off)
}

// A whole-disk resync whose read fails fails its capture and is still
// owed: the next capture ships the whole disk (the trigger was once
// consumed before the read, and the replica's disk silently diverged).
func TestDiskResyncSurvivesAFailedRead(t *testing.T) {
	cfg := guest.Config{Memory: 4 << 20, VCPUs: 1, Disk: filepath.Join(t.TempDir(), "d.img"), Workload: guest.Workload{Kind: guest.WorkloadKV}}
	sg, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer sg.Close()
	if err := sg.ApplyDiskWrites([]guest.DiskWrite{{Offset: 0, Data: bytes.Repeat([]byte{1}, 8192)}}); err != nil {
		t.Fatal(err)
	}
	g := &failingDisk{Guest: sg}
	core := NewCore(g, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	core.ResyncDisk()
	g.fail = true
	if _, err := core.Capture(ctx, CaptureOptions{FlushBudget: 5 * time.Second}); err == nil {
		t.Fatal("a capture whose disk read failed succeeded")
	}
	if g.Paused() {
		sg.Resume()
	}
	cp, err := core.Capture(ctx, CaptureOptions{FlushBudget: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if cp.DiskResync == "" || cp.Breakdown.DiskResync <= 0 {
		t.Fatalf("the resync owed after a failed read was dropped: resync %q, took %v", cp.DiskResync, cp.Breakdown.DiskResync)
	}
}
