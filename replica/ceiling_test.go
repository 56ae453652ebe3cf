package replica

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/precopy"
)

// TestMigrateReportsAttempts: every completion attempt is reported with
// the downtime expected when it was decided, the pages the final sync
// left with the prediction for them, and what happened; the last one
// completed. (The ceiling itself is asserted by test/ against the real
// binary: the race detector slows encoding here.)
func TestMigrateReportsAttempts(t *testing.T) {
	cfg := guest.Config{Memory: 128 << 20, VCPUs: 1, Workload: guest.Workload{
		Kind: guest.WorkloadDirty, Touch: 32 << 20, DirtyRate: 10000, Pattern: guest.PatternRandom,
		Fill: guest.FillRandom, WriteBytes: 4096, WriteData: guest.WriteRandom}}
	src, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	src.Resume()
	time.Sleep(200 * time.Millisecond)
	dst, st, res := migrate(t, src, precopy.DefaultPolicy())
	defer dst.Close()
	if st.SwitchoverDigest != res.Digest {
		t.Fatalf("switchover digests differ: source %s destination %s", st.SwitchoverDigest, res.Digest)
	}
	if len(st.Attempts) == 0 || len(st.Attempts) != st.CompletionAttempts {
		t.Fatalf("%d attempts reported, %d counted", len(st.Attempts), st.CompletionAttempts)
	}
	for i, a := range st.Attempts {
		last := i == len(st.Attempts)-1
		if (a.Outcome == "completed") != last || a.ActualDowntimeMs <= 0 {
			t.Errorf("attempt %d of %d: %+v", i+1, len(st.Attempts), a)
		}
	}
	if a := st.Attempts[len(st.Attempts)-1]; a.ActualDowntimeMs != float64(st.DowntimeMs) || a.FinalExpectedMs <= 0 {
		t.Errorf("last attempt %+v, downtime %d ms", a, st.DowntimeMs)
	}
	t.Logf("attempts %+v", st.Attempts)
}

// burstGuest dirties its whole touched range at the first dirty sync made
// while paused: the burst a guest can make between the last round and the
// pause, which the prediction the attempt was decided on did not see.
type burstGuest struct {
	*synth.Guest
	pages uint64
	burst bool
}

func (g *burstGuest) SyncDirty(dst guest.DirtyLog) (uint64, error) {
	if g.Paused() && !g.burst {
		g.burst = true
		g.MarkDirty(0, g.pages)
	}
	return g.Guest.SyncDirty(dst)
}

// TestMigrateAbortsOverCeiling: when the final sync leaves more than can be
// sent within the limit, the attempt resumes the guest on the source
// without sending, and a later attempt completes with every page.
func TestMigrateAbortsOverCeiling(t *testing.T) {
	cfg := guest.Config{Memory: 256 << 20, VCPUs: 1, Workload: guest.Workload{
		Kind: guest.WorkloadDirty, Touch: 128 << 20, DirtyRate: 2000, Pattern: guest.PatternRandom,
		Fill: guest.FillRandom, WriteBytes: 4096, WriteData: guest.WriteRandom}}
	inner, err := synth.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer inner.Close()
	src := &burstGuest{Guest: inner, pages: cfg.Workload.Touch >> guest.PageShift}
	src.Resume()
	time.Sleep(300 * time.Millisecond)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type recvResult struct {
		res MigrationResult
		err error
	}
	got := make(chan recvResult, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			got <- recvResult{err: err}
			return
		}
		defer conn.Close()
		r := &Receiver{NewGuest: synthFactory, Build: "test"}
		res, err := r.ReceiveMigration(context.Background(), conn, nil)
		got <- recvResult{res, err}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	link, err := Dial(ctx, ln.Addr().String(), Hello{Purpose: PurposeMigrate, Kind: src.Kind(), Config: cfg, Build: "test"}, src.Regions(),
		DialOptions{Stream: checkpoint.Options{Compression: checkpoint.CompressNone}})
	if err != nil {
		t.Fatal(err)
	}
	defer link.Close()
	p := precopy.DefaultPolicy()
	p.DowntimeLimit = 100 * time.Millisecond
	m, err := precopy.NewMigration(precopy.NewCore(src, nil), link, p)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Run(ctx); err != nil {
		t.Fatalf("migration: %v (status %+v)", err, m.Status())
	}
	rr := <-got
	if rr.err != nil {
		t.Fatal(rr.err)
	}
	defer rr.res.Guest.Close()
	st := m.Status()
	if st.SwitchoverDigest != rr.res.Digest {
		t.Fatalf("switchover digests differ: source %s destination %s", st.SwitchoverDigest, rr.res.Digest)
	}
	if len(st.Attempts) < 2 || st.Attempts[0].Outcome != "aborted: prediction" || st.Attempts[len(st.Attempts)-1].Outcome != "completed" {
		t.Fatalf("attempts %+v: want the burst's attempt aborted on its prediction, then a completed one", st.Attempts)
	}
	a := st.Attempts[0]
	if a.FinalPages < src.pages || a.FinalExpectedMs <= 100 {
		t.Errorf("aborted attempt %+v: want at least the %d burst pages, predicted over the limit", a, src.pages)
	}
	if st.AbortedCompletions < 1 {
		t.Errorf("aborted completions %d", st.AbortedCompletions)
	}
	t.Logf("attempts %+v", st.Attempts)
}
