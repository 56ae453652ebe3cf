package replica

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/vfs"
	"github.com/tandemvm/tandem/precopy"
)

// When the store's fsync fails, --sync disk acknowledges nothing more
// (the epoch is not acknowledged, the stream ends, later primaries are
// refused), while --sync memory goes on acknowledging from memory; both
// show the failure in status.
func TestStoreFailureByPolicy(t *testing.T) {
	for _, policy := range []SyncPolicy{SyncMemory, SyncDisk} {
		t.Run(policy.String(), func(t *testing.T) {
			m := vfs.NewMemFS(1)
			vfs.MkdirAllSync(m, sweepSecDir, 0o700)
			x := vfs.NewInject(m)
			cfg := guest.Config{Memory: 4 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
			src, err := synth.New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			src.Resume()
			r := &Receiver{NewGuest: synthFactory, Build: "test", Timeout: 5 * time.Second}
			store, err := OpenStoreWith(sweepStore, nil, StoreOptions{FS: x, Sync: policy})
			if err != nil {
				t.Fatal(err)
			}
			sec := NewSecondary(r, nil)
			sec.Store = store
			defer sec.Close()
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			served := make(chan error, 2)
			go func() {
				for range 2 {
					conn, err := ln.Accept()
					if err != nil {
						served <- err
						return
					}
					served <- sec.Serve(context.Background(), conn)
					conn.Close()
				}
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			hello := Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: cfg, Build: "test"}
			link, err := Dial(ctx, ln.Addr().String(), hello, src.Regions(), DialOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer link.Close()
			core := precopy.NewCore(src, nil)
			sender := &precopy.LiveSender{Core: core, Link: link}
			core.Sync()
			core.Dirty.Clear()
			if _, err := sender.SendAll(ctx); err != nil {
				t.Fatal(err)
			}
			epoch := func() error {
				cp, err := core.Capture(ctx, precopy.CaptureOptions{})
				if err != nil {
					t.Fatal(err)
				}
				w := link.Writer()
				if err := w.WritePages(cp.Pages); err != nil {
					return err
				}
				if err := w.WriteDevices(cp.State); err != nil {
					return err
				}
				ep, err := sender.EndEpoch()
				if err != nil {
					return err
				}
				actx, acancel := context.WithTimeout(ctx, 3*time.Second)
				defer acancel()
				_, err = link.WaitAck(actx, ep, false)
				return err
			}
			for i := range 2 {
				if err := epoch(); err != nil {
					t.Fatalf("epoch %d before the fault: %v", i, err)
				}
			}
			// Every fsync of image.tnd fails from now on.
			x.Add(vfs.Rule{Op: vfs.OpSync, Path: storeFile, Err: errors.New("EIO")})
			err = epoch()
			switch policy {
			case SyncDisk:
				if err == nil {
					t.Fatal("--sync disk acknowledged an epoch its store could not fsync")
				}
				select {
				case err := <-served:
					if err == nil || !strings.Contains(err.Error(), "--sync disk") {
						t.Fatalf("Serve ended with %v", err)
					}
				case <-time.After(5 * time.Second):
					t.Fatal("Serve did not end")
				}
				_, err := Dial(ctx, ln.Addr().String(), hello, src.Regions(), DialOptions{})
				if err == nil || !strings.Contains(err.Error(), "cannot make epochs durable") {
					t.Fatalf("a later primary: %v, want the refusal", err)
				}
				<-served
				if st := sec.Status(false); st.StoreError == "" {
					t.Fatalf("status does not show the store failure: %+v", st)
				}
			case SyncMemory:
				if err != nil {
					t.Fatalf("--sync memory stopped acknowledging: %v", err)
				}
				if err := epoch(); err != nil {
					t.Fatalf("--sync memory, the next epoch: %v", err)
				}
				// The fsync behind the first acknowledgement failed before
				// the next epoch was read.
				if st := sec.Status(false); st.StoreError == "" || st.SyncPolicy != "" {
					t.Fatalf("status does not show the store failure: %+v", st)
				}
				link.Close()
				<-served
				ln.Close()
				<-served
			}
		})
	}
}

// stallFS is a vfs.FS whose file fsyncs block while stalled is set,
// until release is closed.
type stallFS struct {
	vfs.FS
	stalled *atomic.Bool
	release chan struct{}
}

func (x stallFS) OpenFile(name string, flag int, perm fs.FileMode) (vfs.File, error) {
	f, err := x.FS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return stallFile{File: f, x: x}, nil
}

type stallFile struct {
	vfs.File
	x stallFS
}

func (f stallFile) Sync() error {
	if f.x.stalled.Load() {
		<-f.x.release
	}
	return f.File.Sync()
}

// An fsync that does not return is bounded: past the store's
// SyncTimeout the append fails with ErrSyncStalled naming image.tnd (the
// secondary then gives up persistence by its policy) instead of hanging
// the receiving goroutine, and the stall is counted.
func TestStoreFsyncStallIsBounded(t *testing.T) {
	im, cfg := newTestImage(t, 4<<20, nil)
	defer im.Guest().Close()
	m := vfs.NewMemFS(1)
	x := stallFS{FS: m, stalled: new(atomic.Bool), release: make(chan struct{})}
	defer close(x.release) // the abandoned fsync returns and its goroutine ends
	s, err := OpenStoreWith(sweepStore, nil, StoreOptions{FS: x, Sync: SyncDisk, SyncTimeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Begin(im, Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: cfg, Build: "test"}); err != nil {
		t.Fatal(err)
	}
	x.stalled.Store(true)
	var aerr error
	within(t, 5*time.Second, "an append whose fsync stalls", func() {
		aerr = s.Append(im, checkpoint.EpochEnd{Epoch: 2}, nil, nil, nil)
	})
	if !errors.Is(aerr, ErrSyncStalled) || !strings.Contains(aerr.Error(), storeFile) || strings.Contains(aerr.Error(), "\n") {
		t.Fatalf("append with a stalled fsync: %v; want one line, ErrSyncStalled naming %s", aerr, storeFile)
	}
	if s.SyncStalls() != 1 {
		t.Fatalf("%d stalls counted, want 1", s.SyncStalls())
	}
	if e, ok := s.SyncedEpoch(); !ok || e != 1 {
		t.Fatalf("synced epoch %d (%v) after the stall, want still 1", e, ok)
	}
}
