package replica

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/failpoint"
	"github.com/tandemvm/tandem/internal/vfs"
	"github.com/tandemvm/tandem/precopy"
)

// epochSnap is the primary's guest as of one epoch it sent: the digest of
// its memory and state, and its whole disk.
type epochSnap struct {
	digest guest.Digest
	disk   []byte
}

// sweepResult is one row of the crash sweep's table.
type sweepResult struct {
	point     string
	policy    SyncPolicy
	nth       int
	kill      bool // the process dies, the host does not
	fired     bool
	sent      uint64 // last epoch sent before the crash
	acked     uint64 // last epoch the primary saw acknowledged (0: none)
	synced    uint64 // last epoch the store had fsynced at the crash (0: none)
	recovered uint64 // epoch Load came back at (0: none)
	outcome   string
}

const (
	sweepSecDir  = "/sec"
	sweepDisk    = "/sec/disk.img"
	sweepStore   = "/sec/image"
	sweepEpochs  = 6
	sweepTimeout = 10 * time.Second
	junkSize     = 8 << 20 // the secondary's disk file before the catch-up
)

// TestCrashSweepSecondaryStore crashes a secondary's host (a vfs.MemFS
// losing or tearing everything not fsynced) at every failpoint on its
// path from an epoch's arrival to its acknowledgement and fsync, under
// both sync policies, restarts it from the crashed file system, and
// checks the invariants of docs/DURABILITY.md:
//
// The secondary's disk file starts as junk, longer than the primary's
// disk: the catch-up must replace it whole.
//
//   - the store comes back at exactly one epoch E that the primary sent,
//     with memory, state and the whole disk equal to the primary's at E
//     (never memory of one epoch and disk of another);
//   - with --sync disk, E is at least the last acknowledged epoch;
//   - with --sync memory, a store whose host lost power mid-run is not
//     offered (ErrStoreMayLack: an epoch after the last fsync may have
//     been acknowledged); one closed cleanly before the power loss is,
//     at its last epoch;
//
// Each point is crashed at its 1st hit and at its 3rd (for the rewrite
// points the 3rd hit is a compaction: the store compacts after every
// append in those runs).
//
//   - or, when nothing was stored yet, Load says there is nothing
//     (ok=false), and a bad file is an error naming image.tnd.
func TestCrashSweepSecondaryStore(t *testing.T) {
	points := append(failpoint.Names("replica."), "")
	var rows []sweepResult
	for _, policy := range []SyncPolicy{SyncMemory, SyncDisk} {
		for _, name := range points {
			for _, nth := range []int{1, 3} {
				if name == "" && nth == 3 {
					continue
				}
				res := runCrashPoint(t, name, policy, nth, false)
				rows = append(rows, res)
			}
		}
		// The process is killed (no power loss) just before the fsync:
		// the host's page cache keeps every written epoch, so the store
		// comes back at the last acknowledged one even under --sync
		// memory (same boot; the clean-close mark is removed).
		rows = append(rows, runCrashPoint(t, FPAppendBeforeSync.Name(), policy, 3, true))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n%-44s %-6s %3s %5s %4s %5s %6s %9s  %s\n", "failpoint", "sync", "nth", "fired", "sent", "acked", "synced", "recovered", "outcome")
	reached := map[string]bool{}
	for _, r := range rows {
		name := r.point
		if name == "" {
			name = "(none: clean stop, then power loss)"
		}
		if r.kill {
			name += " (kill)"
		}
		fmt.Fprintf(&b, "%-44s %-6s %3d %5v %4d %5d %6d %9d  %s\n", name, r.policy, r.nth, r.fired, r.sent, r.acked, r.synced, r.recovered, r.outcome)
		reached[r.point+r.policy.String()] = reached[r.point+r.policy.String()] || r.fired || r.point == ""
	}
	t.Log(b.String())
	for _, policy := range []SyncPolicy{SyncMemory, SyncDisk} {
		for _, name := range points {
			if name == FPAfterAckBeforeSync.Name() && policy == SyncDisk {
				continue // memory policy only
			}
			if !reached[name+policy.String()] {
				t.Errorf("failpoint %s never fired with --sync %s: the sweep does not cover it", name, policy)
			}
		}
	}
}

func runCrashPoint(t *testing.T, name string, policy SyncPolicy, nth int, kill bool) sweepResult {
	res := sweepResult{point: name, policy: policy, nth: nth, kill: kill}
	t.Run(fmt.Sprintf("%s/%s/%d/kill=%v", strings.TrimPrefix(name, "replica."), policy, nth, kill), func(t *testing.T) {
		m := vfs.NewMemFS(uint64(len(name)*31 + nth))
		if err := vfs.MkdirAllSync(m, sweepSecDir, 0o700); err != nil {
			t.Fatal(err)
		}
		// The secondary's disk file holds junk from some earlier life,
		// longer than the primary's disk: the catch-up must replace it
		// whole (whole disk, then the size mark).
		if err := vfs.WriteFile(m, sweepDisk, bytes.Repeat([]byte{0xee}, junkSize), 0o600); err != nil {
			t.Fatal(err)
		}
		srcDisk := filepath.Join(t.TempDir(), "src.img")
		cfg := guest.Config{Memory: 8 << 20, VCPUs: 1, Disk: srcDisk, Workload: guest.Workload{Kind: guest.WorkloadKV}}
		src, err := synth.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer src.Close()
		var out lines
		src.Console().SetOutput(out.sink)
		src.Resume()

		r := &Receiver{Build: "test", Timeout: 5 * time.Second, DiskPath: sweepDisk,
			NewGuest: func(kind string, c guest.Config) (guest.Guest, error) {
				return synth.NewWithOptions(c, synth.Options{DiskFS: m})
			}}
		boot := func() string { return fmt.Sprint("boot-", m.Crashes()) }
		store, err := OpenStoreWith(sweepStore, nil, StoreOptions{FS: m, Sync: policy, BootID: boot})
		if err != nil {
			t.Fatal(err)
		}
		// A rewrite point's later hits are compactions.
		store.compactAlways = strings.Contains(name, ".rewrite.") && nth > 1
		sec := NewSecondary(r, nil)
		sec.Store = store
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		served := make(chan error, 1)
		go func() {
			conn, err := ln.Accept()
			if err != nil {
				served <- err
				return
			}
			served <- sec.Serve(context.Background(), conn)
			conn.Close()
		}()

		// crashed is set by the failpoint's action on the secondary's
		// goroutine; an acknowledgement read after it was sent by a
		// process whose host had lost power (in-process, the "dead"
		// secondary runs on): it does not count as acknowledged.
		var crashed atomic.Bool
		if name != "" {
			p, ok := failpoint.Lookup(name)
			if !ok {
				t.Fatalf("no failpoint %s", name)
			}
			hits := 0
			defer p.Enable(func() error {
				hits++
				if hits < nth || crashed.Load() {
					return nil
				}
				crashed.Store(true)
				res.fired = true
				if e, ok := store.SyncedEpoch(); ok {
					res.synced = e
				}
				if kill {
					return errors.New("killed")
				}
				m.Crash(vfs.TearUnsynced)
				return errors.New("power loss")
			})()
		}

		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		link, err := Dial(ctx, ln.Addr().String(), Hello{Purpose: PurposeReplicate, Kind: synth.Kind, Config: cfg, Build: "test"},
			src.Regions(), DialOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer link.Close()
		core := precopy.NewCore(src, nil)
		sender := &precopy.LiveSender{Core: core, Link: link}
		core.Sync()
		core.Dirty.Clear()
		snaps := map[uint64]epochSnap{}
		if _, err := sender.SendAll(ctx); err != nil {
			t.Fatal(err)
		}
		for e := 1; e <= sweepEpochs; e++ {
			src.Console().Input([]byte(fmt.Sprintf("c:%d SET key%d value-of-epoch-%d\n", e, e%3, e)))
			out.waitFor(t, fmt.Sprintf("c:%d OK", e))
			cp, err := core.Capture(ctx, precopy.CaptureOptions{FlushBudget: 5 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			w := link.Writer()
			err = w.WritePages(cp.Pages)
			if err == nil && len(cp.Disk) > 0 {
				err = w.WriteDisk(cp.Disk)
			}
			if err == nil {
				err = w.WriteDevices(cp.State)
			}
			var ep uint64
			if err == nil {
				ep, err = sender.EndEpoch()
			}
			if err != nil {
				break // the secondary is gone
			}
			res.sent = ep
			snaps[ep] = snapshot(t, src, srcDisk)
			if e == 1 && len(snaps[ep].disk) >= junkSize {
				t.Fatalf("the primary's disk (%d bytes) is not shorter than the junk (%d): the size mark is not tested", len(snaps[ep].disk), junkSize)
			}
			actx, acancel := context.WithTimeout(ctx, sweepTimeout)
			_, err = link.WaitAck(actx, ep, false)
			acancel()
			if err != nil || crashed.Load() {
				break
			}
			res.acked = ep
		}
		link.Close()
		select {
		case <-served:
		case <-time.After(sweepTimeout):
			t.Fatal("the secondary did not stop")
		}
		sec.Close()
		if kill {
			// A killed process closes nothing cleanly.
			if err := m.Remove(sweepStore + "/" + storeSyncFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
				t.Fatal(err)
			}
		}
		if !crashed.Load() {
			// No failpoint (or it never fired): the process stops
			// cleanly, then the host loses power.
			if e, ok := store.SyncedEpoch(); ok {
				res.synced = e
			}
			m.Crash(vfs.TearUnsynced)
		}

		// Restart from what the crash left.
		store2, err := OpenStoreWith(sweepStore, nil, StoreOptions{FS: m, Sync: policy, BootID: boot})
		if err != nil {
			t.Fatalf("reopen the store: %v", err)
		}
		sec2 := NewSecondary(r, nil)
		sec2.Store = store2
		c, ok, err := sec2.LoadStored()
		switch {
		case err != nil:
			if !strings.Contains(err.Error(), storeFile) {
				t.Fatalf("a refusal must name %s: %v", storeFile, err)
			}
			if !errors.Is(err, ErrStoreMayLack) || policy != SyncMemory {
				t.Fatalf("--sync %s: refused: %v", policy, err)
			}
			res.outcome = "refused: may lack acked epochs (memory policy, host restarted)"
			// The operator's override offers it anyway, as whatever
			// epoch survived: never one that was not sent, never less
			// than what was fsynced.
			forced, err := OpenStoreWith(sweepStore, nil, StoreOptions{FS: m, Sync: policy, BootID: boot, AcceptUnsynced: true})
			if err != nil {
				t.Fatal(err)
			}
			sec3 := NewSecondary(r, nil)
			sec3.Store = forced
			defer sec3.Close()
			c, ok, err := sec3.LoadStored()
			switch {
			case err != nil:
				t.Fatalf("--accept-unsynced-image still refused: %v", err)
			case ok && (!c.Consistent || c.Epoch > res.sent || c.Epoch < res.synced):
				t.Fatalf("--accept-unsynced-image offered epoch %d (consistent %v); sent %d, fsynced %d", c.Epoch, c.Consistent, res.sent, res.synced)
			case ok:
				res.outcome += fmt.Sprintf("; forced: epoch %d", c.Epoch)
			}
			return
		case !ok:
			res.outcome = "nothing stored (needs a full sync)"
			if policy == SyncDisk && res.acked > 0 {
				t.Fatalf("--sync disk: epoch %d was acknowledged and nothing survived", res.acked)
			}
			if res.synced > 0 {
				t.Fatalf("epoch %d was fsynced and nothing survived", res.synced)
			}
			return
		}
		res.recovered = c.Epoch
		if policy == SyncMemory && crashed.Load() && !kill {
			t.Fatalf("--sync memory: a crashed store was offered at epoch %d: it may lack acknowledged epochs", c.Epoch)
		}
		want, sent := snaps[c.Epoch]
		switch {
		case !c.Consistent:
			t.Fatalf("recovered an inconsistent image at epoch %d", c.Epoch)
		case !sent && c.Epoch != 0:
			// The catch-up's base epoch is the first one Begin stores.
		case (policy == SyncDisk || kill) && c.Epoch < res.acked:
			t.Fatalf("--sync %s (kill %v): recovered epoch %d, but epoch %d was acknowledged", policy, kill, c.Epoch, res.acked)
		case c.Epoch < res.synced:
			t.Fatalf("recovered epoch %d, but epoch %d was fsynced", c.Epoch, res.synced)
		case c.Epoch > res.sent:
			t.Fatalf("recovered epoch %d, never sent (last %d)", c.Epoch, res.sent)
		}
		g, _, _, err := sec2.Activate()
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		st, _ := g.SaveState()
		gotDigest := guest.CombineDigest(guest.ScanMemory(g.Regions()).Sum(), st)
		gotDisk, err := vfs.ReadFile(m, sweepDisk)
		if err != nil {
			t.Fatal(err)
		}
		if sent {
			if gotDigest != want.digest {
				t.Fatalf("recovered epoch %d: memory and state differ from the primary's at that epoch", c.Epoch)
			}
			if !sameDisk(gotDisk, want.disk) {
				t.Fatalf("recovered epoch %d: the disk differs from the primary's at that epoch (memory of one epoch, disk of another)", c.Epoch)
			}
		}
		switch {
		case c.Epoch >= res.acked:
			res.outcome = "ok: every acknowledged epoch kept"
		default:
			res.outcome = fmt.Sprintf("ok by contract: acked %d..%d lost (memory policy, not yet fsynced)", c.Epoch+1, res.acked)
		}
		if name == "" {
			res.fired = false
		}
	})
	return res
}

// snapshot reads the primary's memory, state and disk as of the last
// capture (the kv guest is idle between commands).
func snapshot(t *testing.T, src *synth.Guest, disk string) epochSnap {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	src.Pause(ctx)
	defer src.Resume()
	st, err := src.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	return epochSnap{digest: guest.CombineDigest(guest.ScanMemory(src.Regions()).Sum(), st), disk: b}
}

// sameDisk compares two disk files; bytes past the shorter one's end
// must be zero (a sparse tail).
func sameDisk(a, b []byte) bool {
	n := min(len(a), len(b))
	if !bytes.Equal(a[:n], b[:n]) {
		return false
	}
	for _, x := range append(a[n:], b[n:]...) {
		if x != 0 {
			return false
		}
	}
	return true
}
