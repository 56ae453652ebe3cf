package block

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/vfs"
)

// slowFS wraps the real file system and counts syncs, so tests can check
// what reached the file.
type countingFS struct {
	vfs.FS
	syncs atomic.Int64
}

type countingFile struct {
	vfs.File
	fs *countingFS
}

func (c *countingFile) Sync() error {
	c.fs.syncs.Add(1)
	return c.File.Sync()
}

func (c *countingFS) OpenFile(name string, flag int, perm os.FileMode) (vfs.File, error) {
	f, err := vfs.Default.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &countingFile{File: f, fs: c}, nil
}

func openTemp(t *testing.T, opts Options) *Disk {
	t.Helper()
	d, err := Open(filepath.Join(t.TempDir(), "disk.img"), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestWriteFlushTake(t *testing.T) {
	d := openTemp(t, Options{})
	var done sync.WaitGroup
	for i := 0; i < 10; i++ {
		done.Add(1)
		if err := d.Write(uint64(i)*512, bytes.Repeat([]byte{byte(i + 1)}, 512), func(err error) {
			if err != nil {
				t.Errorf("write: %v", err)
			}
			done.Done()
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Flush(ctxFor(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	done.Wait()
	ws := d.TakeWrites()
	if len(ws) != 10 {
		t.Fatalf("took %d writes, want 10", len(ws))
	}
	for i, w := range ws {
		if w.Offset != uint64(i)*512 || w.Data[0] != byte(i+1) {
			t.Fatalf("write %d: offset %d data %d", i, w.Offset, w.Data[0])
		}
	}
	if len(d.TakeWrites()) != 0 {
		t.Fatal("second TakeWrites not empty")
	}
	buf := make([]byte, 512)
	if _, err := d.ReadAt(buf, 9*512); err != nil || buf[0] != 10 {
		t.Fatalf("read back %d, %v", buf[0], err)
	}
}

func TestStalledFlushMissesDeadlineThenCompletes(t *testing.T) {
	fs := &countingFS{FS: vfs.Default}
	d := openTemp(t, Options{FS: fs})
	if err := d.Write(0, []byte("hello"), nil); err != nil {
		t.Fatal(err)
	}
	d.StallFlush(400 * time.Millisecond)
	start := time.Now()
	err := d.Flush(ctxFor(t, 50*time.Millisecond))
	took := time.Since(start)
	if !errors.Is(err, guest.ErrFlushDeadline) {
		t.Fatalf("stalled flush: err %v, want ErrFlushDeadline", err)
	}
	if took > 300*time.Millisecond {
		t.Fatalf("stalled flush returned after %v, want about the 50ms deadline", took)
	}
	if fs.syncs.Load() != 0 {
		t.Fatal("stalled flush synced before its stall ended")
	}
	// A later flush with no new writes joins the stalled one and completes.
	if err := d.Flush(ctxFor(t, 5*time.Second)); err != nil {
		t.Fatalf("later flush: %v", err)
	}
	if time.Since(start) < 350*time.Millisecond {
		t.Fatal("later flush returned before the stall ended")
	}
	if n := fs.syncs.Load(); n != 1 {
		t.Fatalf("%d syncs, want 1 (the later flush joins)", n)
	}
	// Writes queued behind a stalled flush complete after it.
	d.StallFlush(200 * time.Millisecond)
	d.Flush(ctxFor(t, time.Millisecond))
	d.Write(10, []byte("x"), nil)
	if err := d.Flush(ctxFor(t, 5*time.Second)); err != nil {
		t.Fatalf("flush behind stalled flush: %v", err)
	}
	if n := fs.syncs.Load(); n != 3 {
		t.Fatalf("%d syncs, want 3", n)
	}
}

func TestFailedWriteReported(t *testing.T) {
	d := openTemp(t, Options{})
	boom := errors.New("injected EIO")
	d.FailNextWrite(boom)
	got := make(chan error, 1)
	d.Write(0, []byte("lost"), func(err error) { got <- err })
	d.Write(100, []byte("kept"), nil)
	select {
	case err := <-got:
		if !errors.Is(err, boom) {
			t.Fatalf("completion err %v, want injected", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no completion")
	}
	if err := d.Flush(ctxFor(t, 5*time.Second)); !errors.Is(err, boom) {
		t.Fatalf("flush after failed write: %v, want injected error", err)
	}
	ws := d.TakeWrites()
	if len(ws) != 1 || string(ws[0].Data) != "kept" {
		t.Fatalf("log %+v, want only the kept write", ws)
	}
	if err := d.Flush(ctxFor(t, 5*time.Second)); err != nil {
		t.Fatalf("flush after reported failure: %v", err)
	}
}

func TestUnseenFlushErrorReportedLater(t *testing.T) {
	d := openTemp(t, Options{})
	d.FailNextWrite(errors.New("injected"))
	d.Write(0, []byte("a"), nil)
	d.StallFlush(100 * time.Millisecond)
	if err := d.Flush(ctxFor(t, time.Millisecond)); !errors.Is(err, guest.ErrFlushDeadline) {
		t.Fatalf("want deadline, got %v", err)
	}
	time.Sleep(300 * time.Millisecond) // the flush finishes with nobody waiting
	if err := d.Flush(ctxFor(t, 5*time.Second)); err == nil {
		t.Fatal("the failure of a flush nobody waited for was lost")
	}
}

func TestApply(t *testing.T) {
	src := openTemp(t, Options{})
	dst := openTemp(t, Options{})
	src.Write(4096, []byte("page one"), nil)
	src.Write(0, []byte("start"), nil)
	src.Write(4096, []byte("PAGE"), nil)
	if err := src.Flush(ctxFor(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := dst.Apply(src.TakeWrites()); err != nil {
		t.Fatal(err)
	}
	if len(dst.TakeWrites()) != 0 {
		t.Fatal("applied writes entered the replica's own log")
	}
	a, b := make([]byte, 8192), make([]byte, 8192)
	src.ReadAt(a, 0)
	dst.ReadAt(b, 0)
	if !bytes.Equal(a, b) {
		t.Fatal("replica disk differs")
	}
	if !bytes.HasPrefix(b[4096:], []byte("PAGE one")) {
		t.Fatalf("order not kept: %q", b[4096:4104])
	}
}

func TestLogBounded(t *testing.T) {
	d := openTemp(t, Options{MaxLogBytes: 1000})
	for i := 0; i < 5; i++ {
		d.Write(0, make([]byte, 300), nil)
	}
	d.Flush(ctxFor(t, 5*time.Second))
	if n := len(d.TakeWrites()); n != 1 || d.Dropped() != 4 {
		t.Fatalf("log %d dropped %d, want 1 and 4", n, d.Dropped())
	}
}

func TestCloseStopsStalledFlush(t *testing.T) {
	d, err := Open(filepath.Join(t.TempDir(), "d"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	d.StallFlush(time.Hour)
	d.Write(0, []byte("x"), nil)
	d.Flush(ctxFor(t, time.Millisecond))
	pending := make(chan error, 1)
	d.Write(1, []byte("y"), func(err error) { pending <- err })
	start := time.Now()
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if time.Since(start) > time.Second {
		t.Fatal("Close waited for the stall")
	}
	if err := <-pending; !errors.Is(err, guest.ErrClosed) {
		t.Fatalf("queued write at close: %v", err)
	}
	if err := d.Write(0, nil, nil); !errors.Is(err, guest.ErrClosed) {
		t.Fatalf("write after close: %v", err)
	}
	if err := d.Flush(context.Background()); !errors.Is(err, guest.ErrClosed) {
		t.Fatalf("flush after close: %v", err)
	}
}

func TestFlushObserverSeesTheWholeStall(t *testing.T) {
	d, err := Open(filepath.Join(t.TempDir(), "disk"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make(chan time.Duration, 1)
	d.SetObserver(func(op string, _ time.Time, took time.Duration, _ error) {
		if op == OpFlush {
			got <- took
		}
	})
	d.StallFlush(300 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := d.Flush(ctx); err == nil {
		t.Fatal("stalled flush met a 20ms deadline")
	}
	select {
	case took := <-got:
		if took < 300*time.Millisecond {
			t.Fatalf("observer saw %v, want the whole 300ms stall", took)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("observer never told of the flush")
	}
}

// A write without data is a size mark: Apply sets the file's size to its
// offset (a replica's longer disk file is cut to the primary's disk). A
// guest's write of nothing is not logged (it would read as a size mark).
func TestApplySizeMarkAndEmptyWrites(t *testing.T) {
	d := openTemp(t, Options{})
	defer d.Close()
	if err := d.Apply([]guest.DiskWrite{{Offset: 0, Data: bytes.Repeat([]byte{1}, 8192)}}); err != nil {
		t.Fatal(err)
	}
	if err := d.Apply([]guest.DiskWrite{{Offset: 10, Data: []byte{2}}, {Offset: 4096}}); err != nil {
		t.Fatal(err)
	}
	if n, _ := d.Size(); n != 4096 {
		t.Fatalf("size %d after a size mark of 4096", n)
	}
	b := make([]byte, 11)
	d.ReadAt(b, 0)
	if b[10] != 2 || b[0] != 1 {
		t.Fatalf("content %v", b)
	}
	if err := d.Write(100, nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := d.Write(0, []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(ctxFor(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	ws := d.TakeWrites()
	if len(ws) != 1 || len(ws[0].Data) != 1 {
		t.Fatalf("logged %v: a write of nothing must not be logged", ws)
	}
}

// TestStallWriteIsObserved: a stalled write takes its stall and the
// observer is told of it by operation.
func TestStallWriteIsObserved(t *testing.T) {
	d, err := Open(filepath.Join(t.TempDir(), "disk.img"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	type obs struct {
		op   string
		took time.Duration
	}
	got := make(chan obs, 8)
	d.SetObserver(func(op string, _ time.Time, took time.Duration, _ error) { got <- obs{op, took} })
	d.StallWrite(150 * time.Millisecond)
	done := make(chan error, 1)
	if err := d.Write(0, make([]byte, 4096), func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("stalled write never completed")
	}
	o := <-got
	if o.op != OpWrite || o.took < 150*time.Millisecond {
		t.Fatalf("observed %+v, want a write of at least 150ms", o)
	}
	// The stall was for one write only.
	if err := d.Write(4096, make([]byte, 4096), nil); err != nil {
		t.Fatal(err)
	}
	if o := <-got; o.op != OpWrite || o.took >= 150*time.Millisecond {
		t.Fatalf("second write %+v, want a quick one", o)
	}
	if _, err := d.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	if o := <-got; o.op != OpRead {
		t.Fatalf("after a read the observer saw %+v", o)
	}
}
