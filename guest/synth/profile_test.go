package synth

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// waitTouched waits until every vCPU has finished its touch phase.
func waitTouched(t *testing.T, g *Guest) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		mustPause(t, g)
		done := true
		for _, v := range g.vcpus {
			done = done && v.st.Phase == phaseDirty
		}
		if done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("touch phase not done in 20s")
		}
		mustResume(t, g)
		time.Sleep(5 * time.Millisecond)
	}
}

// TestFillProfiles: the touched pages hold guest.FillPage's bytes (the
// micro-guest writes the same; guest/kvm TestFillMatchesSynth), a file
// fill repeats the file, and mixed zero pages stay unwritten.
func TestFillProfiles(t *testing.T) {
	file := filepath.Join(t.TempDir(), "image")
	if err := os.WriteFile(file, []byte(strings.Repeat("0123456789abcdef", 300)+"tail"), 0o600); err != nil {
		t.Fatal(err)
	}
	fileData, _ := os.ReadFile(file)
	for _, fill := range []string{guest.FillZero, guest.FillRandom, guest.FillText, guest.FillMixed, "file:" + file} {
		t.Run(strings.SplitN(fill, ":", 2)[0], func(t *testing.T) {
			cfg := dirtyConfig(guest.PatternRandom)
			cfg.Workload.DirtyRate, cfg.Workload.Fill, cfg.Workload.Seed = 0, fill, 42
			g := mustNew(t, cfg)
			mustResume(t, g)
			waitTouched(t, g)
			want := make([]byte, guest.PageSize)
			for p := uint64(0); p < cfg.Workload.Touch>>guest.PageShift; p++ {
				clear(want)
				if guest.FillKind(fill) == guest.FillKindFile {
					guest.FillFromFile(want, fileData, p)
				} else {
					guest.FillPage(want, guest.FillKind(fill), 42, p)
				}
				if got := g.mem.mem[p<<guest.PageShift : (p+1)<<guest.PageShift]; !bytes.Equal(got, want) {
					t.Fatalf("page %d: %q..., want %q...", p, got[:24], want[:24])
				}
			}
		})
	}
}

// TestFillFileAtBootOnly: a missing fill file fails the booting guest's
// first Resume, but a restored guest never reads it.
func TestFillFileAtBootOnly(t *testing.T) {
	cfg := dirtyConfig(guest.PatternRandom)
	cfg.Workload.Fill = "file:" + filepath.Join(t.TempDir(), "missing")
	g := mustNew(t, cfg)
	if _, err := g.Resume(); err == nil || !strings.Contains(err.Error(), "--fill") {
		t.Fatalf("Resume with a missing fill file: %v", err)
	}
}

// TestWriteProfiles: writes of N bytes of random data change at most N
// bytes of a page at guest.WriteOffset; 4096-byte text writes leave text.
func TestWriteProfiles(t *testing.T) {
	for _, tc := range []struct {
		n    int
		data string
	}{{64, guest.WriteRandom}, {4096, guest.WriteText}, {100, guest.WriteCounter}} {
		t.Run(fmt.Sprintf("%d-%s", tc.n, tc.data), func(t *testing.T) {
			cfg := dirtyConfig(guest.PatternRandom)
			cfg.VCPUs = 1
			cfg.Workload.DirtyRate, cfg.Workload.WriteBytes, cfg.Workload.WriteData = 0, tc.n, tc.data
			g := mustNew(t, cfg)
			mustResume(t, g)
			waitTouched(t, g)
			v := g.vcpus[0]
			for i := 0; i < 1000; i++ {
				p := v.nextPage()
				v.st.Counter++
				before := append([]byte(nil), g.mem.mem[p<<guest.PageShift:(p+1)<<guest.PageShift]...)
				v.write(p, v.st.Counter)
				after := g.mem.mem[p<<guest.PageShift : (p+1)<<guest.PageShift]
				off := guest.WriteOffset(tc.n, v.st.Counter, p)
				want := make([]byte, tc.n)
				guest.WriteData(want, guest.WriteKind(tc.data), cfg.Workload.Seed, v.st.Counter, p)
				if !bytes.Equal(after[off:off+uint64(tc.n)], want) {
					t.Fatalf("write %d to page %d: data differs from guest.WriteData", i, p)
				}
				if !bytes.Equal(after[:off], before[:off]) || !bytes.Equal(after[off+uint64(tc.n):], before[off+uint64(tc.n):]) {
					t.Fatalf("write %d to page %d changed bytes outside [%d, +%d)", i, p, off, tc.n)
				}
			}
		})
	}
}

// TestKVTableScales: a 1 GiB guest's kv table holds well over 1,000,000
// slots, and keys beyond the old 65,536-slot table go in. Under
// TANDEM_LONG=1, 1,000,000 keys with 64-byte values.
func TestKVTableScales(t *testing.T) {
	l, err := layoutFor(1 << 30)
	if err != nil {
		t.Fatal(err)
	}
	if l.kvSlots < 2_000_000 {
		t.Fatalf("1 GiB guest: %d kv slots", l.kvSlots)
	}
	keys := 100_000
	if os.Getenv("TANDEM_LONG") != "" {
		keys = 1_000_000
	}
	g := mustNew(t, guest.Config{Memory: 1 << 30, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	g.kv.boot()
	val := strings.Repeat("v", 64)
	for i := 1; i <= keys; i++ {
		reply, _ := g.kv.serve(fmt.Appendf(nil, "c:%d SET key-%07d %s", i, i, val))
		if want := fmt.Sprintf("c:%d OK", i); string(reply) != want {
			t.Fatalf("key %d: %q", i, reply)
		}
	}
	reply, _ := g.kv.serve([]byte("d:1 GET key-0000001"))
	if string(reply) != "d:1 OK "+val {
		t.Fatalf("GET: %q", reply)
	}
}

// TestKVTableAdoptsOldLayout: an image whose table was laid out before
// the table scaled with memory (65,536 kv slots in any guest over 32 MiB)
// restores into this build with its keys.
func TestKVTableAdoptsOldLayout(t *testing.T) {
	cfg := guest.Config{Memory: 256 << 20, VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}}
	g := mustNew(t, cfg)
	old := kvLayout{clientSlots: maxClients, kvSlots: 1 << 16, clientOff: guest.PageSize}
	old.kvOff = old.clientOff + old.clientSlots*slotSize
	g.kv.l = old
	g.kv.boot()
	g.booted = true
	for i, req := range []string{"c:1 SET k1 v1", "c:2 SET k2 v2"} {
		if reply, _ := g.kv.serve([]byte(req)); string(reply) != fmt.Sprintf("c:%d OK", i+1) {
			t.Fatalf("%s: %q", req, reply)
		}
	}
	img := capture(t, g)
	r := img.restore(t, cfg)
	if r.kv.l == old {
		t.Fatal("the restored guest started with the old layout: the test proves nothing")
	}
	out := &output{}
	r.Console().SetOutput(out.sink)
	mustResume(t, r)
	got := exchange(t, r, out, "c:3 GET k1", "c:4 GET k2")
	if got[0] != "c:3 OK v1" || got[1] != "c:4 OK v2" {
		t.Fatalf("after restore: %q", got)
	}
	if r.kv.l != old {
		t.Fatalf("layout %+v, want the image's %+v", r.kv.l, old)
	}
}
