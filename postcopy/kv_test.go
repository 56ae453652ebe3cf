package postcopy

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
	"github.com/tandemvm/tandem/precopy"
)

// console collects a guest's console lines.
type console struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	lines []string
}

func (c *console) sink(p []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf.Write(p)
	for {
		i := bytes.IndexByte(c.buf.Bytes(), '\n')
		if i < 0 {
			return
		}
		c.lines = append(c.lines, string(c.buf.Next(i + 1)[:i]))
	}
}

// exchange sends lines (in batches, as the console's buffer is bounded)
// and returns the replies.
func (c *console) exchange(t *testing.T, g guest.Guest, lines []string) []string {
	t.Helper()
	var got []string
	for len(lines) > 0 {
		n := min(len(lines), 32)
		if err := g.Console().Input([]byte(strings.Join(lines[:n], "\n") + "\n")); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for {
			c.mu.Lock()
			k := len(c.lines)
			c.mu.Unlock()
			if k >= n {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("waited 20s for %d replies, have %d", n, k)
			}
			time.Sleep(time.Millisecond)
		}
		c.mu.Lock()
		got = append(got, c.lines...)
		c.lines = nil
		c.mu.Unlock()
		lines = lines[n:]
	}
	return got
}

// kvScript is a run of requests: SETs of keys [from, to) by client cl,
// with values that depend on tag.
func kvScript(cl string, seq *int, op string, from, to int, tag string) []string {
	var out []string
	for k := from; k < to; k++ {
		*seq++
		if op == "SET" {
			out = append(out, fmt.Sprintf("%s:%d SET key%d %s%d", cl, *seq, k, tag, k))
		} else {
			out = append(out, fmt.Sprintf("%s:%d %s key%d", cl, *seq, op, k))
		}
	}
	return out
}

// kind builds guests of each kind; setPostcopy and vcpuOf are nil where
// the kind needs none (a KVM vCPU faults inside KVM_RUN).
type kind struct {
	name        string
	new         func(guest.Config) (guest.Guest, error)
	setPostcopy func(guest.Guest, bool)
	vcpuOf      func(guest.Guest) func(uint32) int
}

var synthKind = kind{
	name:        "synth",
	new:         func(c guest.Config) (guest.Guest, error) { return synth.New(c) },
	setPostcopy: func(g guest.Guest, on bool) { g.(*synth.Guest).SetPostcopy(on) },
	vcpuOf:      func(g guest.Guest) func(uint32) int { return g.(*synth.Guest).VCPUOfThread },
}

func startGuest(t *testing.T, k kind, cfg guest.Config) (guest.Guest, *console) {
	t.Helper()
	g, err := k.new(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	c := &console{}
	g.Console().SetOutput(c.sink)
	return g, c
}

// A kv guest migrated post-copy answers, reply for reply, as a guest that
// never moved: its first requests on the destination fault on the pages
// the switch left behind, and the digest proves the destination started
// from the source's image.
func TestPostcopySynthKVMatchesUnmigrated(t *testing.T) {
	testKVMatchesUnmigrated(t, synthKind, 2)
}

func testKVMatchesUnmigrated(t *testing.T, k kind, vcpus int) {
	cfg := guest.Config{Memory: 64 << 20, VCPUs: vcpus, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	seq := 0
	before := kvScript("c", &seq, "SET", 0, 400, "a")
	dirtying := append(kvScript("c", &seq, "SET", 200, 800, "b"), kvScript("c", &seq, "DEL", 0, 50, "")...)
	after := append(kvScript("c", &seq, "GET", 0, 800, ""), kvScript("c", &seq, "SET", 700, 900, "c")...)
	after = append(after, kvScript("c", &seq, "GET", 650, 900, "")...)

	ref, refOut := startGuest(t, k, cfg)
	if _, err := ref.Resume(); err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, s := range [][]string{before, dirtying, after} {
		want = append(want, refOut.exchange(t, ref, s)...)
	}

	src, srcOut := startGuest(t, k, cfg)
	if _, err := src.Resume(); err != nil {
		t.Fatal(err)
	}
	got := srcOut.exchange(t, src, before)
	// Round 0 of a precopy: everything the source holds now.
	dst, dstOut := startGuest(t, k, cfg)
	pages := newPageMap(src.Regions()).limit
	if _, err := src.SyncDirty(precopy.NewBitmap(pages)); err != nil {
		t.Fatal(err)
	}
	for i, r := range src.Regions() {
		copy(dst.Regions()[i].Mem, r.Mem)
	}
	got = append(got, srcOut.exchange(t, src, dirtying)...)
	// The switch: pause, the pages dirtied since round 0 are missing.
	if _, err := src.Pause(context.Background()); err != nil {
		t.Fatal(err)
	}
	missing := precopy.NewBitmap(pages)
	if _, err := src.SyncDirty(missing); err != nil {
		t.Fatal(err)
	}
	state, err := src.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	digest := guest.CombineDigest(guest.ScanMemory(src.Regions()).Sum(), state)
	owed := missing.Count()
	if err := dst.LoadState(state); err != nil {
		t.Fatal(err)
	}
	tc := TargetConfig{Regions: dst.Regions(), Missing: missing, State: state, VCPUs: cfg.VCPUs}
	if k.vcpuOf != nil {
		tc.VCPUOf = k.vcpuOf(dst)
	}
	tg, err := NewTarget(tc)
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	if k.setPostcopy != nil {
		k.setPostcopy(dst, true)
	}
	l := newLinks(t)
	// A slow push, so the guest's requests fault before the pages come.
	l.srcBulk = slowConn{l.srcBulk, 4 << 10, 2 * time.Millisecond}
	source := NewSource(src.Regions(), digest)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var srcErr, dstErr error
	var wg sync.WaitGroup
	wg.Go(func() { srcErr, dstErr = runBoth(ctx, source, tg, l) })
	// Resume may read a missing page (the synth kv table's header): the
	// runs serve it.
	if _, err := dst.Resume(); err != nil {
		t.Fatal(err)
	}
	got = append(got, dstOut.exchange(t, dst, after)...)
	wg.Wait()
	if k.setPostcopy != nil {
		k.setPostcopy(dst, false)
	}
	if srcErr != nil || dstErr != nil {
		t.Fatalf("source: %v; destination: %v", srcErr, dstErr)
	}
	if !slices.Equal(got, want) {
		for i := range min(len(got), len(want)) {
			if got[i] != want[i] {
				t.Fatalf("reply %d: %q, unmigrated %q (of %d, %d)", i, got[i], want[i], len(got), len(want))
			}
		}
		t.Fatalf("%d replies, unmigrated %d", len(got), len(want))
	}
	st, ss := tg.Stats(), source.Stats()
	if st.Digest != digest.String() || st.Requests == 0 || st.Blocktime == 0 {
		t.Fatalf("stats %+v (source %+v): want the source's digest %s and faults served", st, ss, digest)
	}
	if k.vcpuOf != nil && st.BlocktimeMs[0] == 0 {
		t.Fatalf("no blocked time on vCPU 0, which serves the console: %+v", st)
	}
	t.Logf("%s: %d replies equal; %d pages owed at the switch: %d faults, %d served on request, %d pushed; blocked %v (vCPU ms %v)",
		k.name, len(got), owed, st.Faults, ss.Requests, ss.Pushed, st.Blocktime, st.BlocktimeMs)
}
