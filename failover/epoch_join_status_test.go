package failover

import (
	"testing"
	"time"
	"unsafe"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/internal/smaps"
)

// TestJoinFiguresKeptApart: the epochs paused before protection began
// (the join's) are left out of the status's pause and acknowledgement
// quantiles and reported as join_pause_max_ms and join_ack_max_ms; every
// epoch is counted in one or the other.
func TestJoinFiguresKeptApart(t *testing.T) {
	cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{
		Kind: guest.WorkloadDirty, Touch: 16 << 20, DirtyRate: 4000, Pattern: guest.PatternSeq}}
	p := startTestPair(t, synth.Kind, cfg, EpochConfig{})
	defer p.stop()
	if st := p.loop.Status(); st.JoinPauseMaxMs != nil && !st.Protected {
		t.Fatalf("join figures %v before any protection", *st.JoinPauseMaxMs)
	}
	waitFor(t, 30*time.Second, "20 acknowledged epochs", func() bool { return p.loop.Status().AckedEpochs >= 20 })
	st := p.loop.Status()
	if st.JoinPauseMaxMs == nil || st.JoinAckMaxMs == nil {
		t.Fatal("no join figures once protected")
	}
	if st.DeltaCacheBypasses != 0 {
		t.Fatalf("%d delta-cache bypasses for 8-byte writes, which deltas carry", st.DeltaCacheBypasses)
	}
	if *st.JoinAckMaxMs <= 0 {
		t.Fatalf("join_ack_max_ms %v: the first epoch's acknowledgement is the join's", *st.JoinAckMaxMs)
	}
	l := p.loop
	l.mu.Lock()
	epochs, pauses, acked, acks := l.epochs, len(l.pauses), l.acked, len(l.ackLatency)
	joinFrom := l.protectedAt
	l.mu.Unlock()
	if joinFrom.IsZero() {
		t.Fatal("protected, but no time protection began")
	}
	if pauses == 0 || uint64(pauses) >= epochs {
		t.Fatalf("%d of %d epochs' pauses in the quantiles: the join's must be left out, the rest kept", pauses, epochs)
	}
	if acks == 0 || uint64(acks) >= acked {
		t.Fatalf("%d of %d acknowledgements in the quantiles: the join's must be left out, the rest kept", acks, acked)
	}
}

// TestProtectedGuestWholeWritesHuge: protecting a guest advises huge
// pages on the range it writes whole (guest.AdviseWholeWrites).
func TestProtectedGuestWholeWritesHuge(t *testing.T) {
	cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{
		Kind: guest.WorkloadDirty, Touch: 16 << 20, DirtyRate: 4000, Pattern: guest.PatternSeq}}
	p := startTestPair(t, synth.Kind, cfg, EpochConfig{})
	defer p.stop()
	waitFor(t, 30*time.Second, "protection", func() bool { return p.loop.Status().Protected })
	mem := p.g.Regions()[0].Mem
	base := uintptr(unsafe.Pointer(&mem[0]))
	addr := (base+2<<20-1)&^(2<<20-1) + 1<<20 // inside the first whole 2 MiB block
	flags, _, found, err := smaps.Mapping(addr)
	if err != nil {
		t.Skipf("no smaps: %v", err)
	}
	if !found || !smaps.HugeAdvised(flags) {
		t.Fatalf("the protected guest's dirty range is not advised MADV_HUGEPAGE (flags %q)", flags)
	}
}

// TestDeltaCacheBypassInStatus: a guest rewriting whole pages with fresh
// data makes the stream set its delta cache aside, and the status counts
// it.
func TestDeltaCacheBypassInStatus(t *testing.T) {
	cfg := guest.Config{Memory: 64 << 20, VCPUs: 1, Workload: guest.Workload{
		Kind: guest.WorkloadDirty, Touch: 4 << 20, DirtyRate: 20000, Pattern: guest.PatternRandom,
		Fill: guest.FillRandom, WriteBytes: guest.PageSize, WriteData: guest.WriteRandom}}
	p := startTestPair(t, synth.Kind, cfg, EpochConfig{})
	defer p.stop()
	waitFor(t, 30*time.Second, "a delta-cache bypass", func() bool { return p.loop.Status().DeltaCacheBypasses > 0 })
}
