package kvm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
)

// pageAt is the guest page at gpa.
func (g *Guest) pageAt(gpa uint64) []byte {
	for _, r := range g.regions {
		if gpa >= r.GPA && gpa < r.GPA+uint64(len(r.Mem)) {
			off := gpa - r.GPA
			return r.Mem[off : off+guest.PageSize]
		}
	}
	return nil
}

// TestFillMatchesSynth: the micro-guest's touch writes, for every fill
// profile, exactly the bytes guest.FillPage specifies (which the synth
// guest writes), so the same seed gives the same memory in both guests.
func TestFillMatchesSynth(t *testing.T) {
	skipWithoutKVM(t)
	file := filepath.Join(t.TempDir(), "image")
	if err := os.WriteFile(file, bytes.Repeat([]byte("replayed memory image "), 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, fill := range []string{guest.FillZero, guest.FillRandom, guest.FillText, guest.FillMixed, "file:" + file} {
		t.Run(strings.SplitN(fill, ":", 2)[0], func(t *testing.T) {
			// A file fill is the VMM's: its range crosses the 32-bit hole
			// (the last 2 MiB sit above it). Generated fills run in the
			// guest, which would take tens of seconds to touch 3 GiB here.
			cfg := dirtyConfig(64<<20, 8<<20, 0, guest.PatternSeq, 2)
			if guest.FillKind(fill) == guest.FillKindFile {
				cfg = dirtyConfig(lowRAMEnd+2<<20, lowRAMEnd-dataGPA+4<<20, 0, guest.PatternSeq, 2)
			}
			cfg.Workload.Fill, cfg.Workload.Seed = fill, 42
			g, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			mustResume(t, g)
			waitProgress(t, g, 1)
			mustPause(t, g)
			var fileData []byte
			if guest.FillKind(fill) == guest.FillKindFile {
				fileData, _ = os.ReadFile(file)
			}
			pages := touchedPages(cfg)
			want := make([]byte, guest.PageSize)
			// Every page, or every 97th and some from the end of a 3 GiB range.
			step := uint64(1)
			if pages > 1<<16 {
				step = 97
			}
			for p := uint64(0); p < pages; p += step {
				for _, q := range []uint64{p, pages - 1 - p%3} {
					clear(want)
					if fileData != nil {
						guest.FillFromFile(want, fileData, q)
					} else {
						guest.FillPage(want, guest.FillKind(fill), 42, q)
					}
					if got := g.pageAt(dataPageGPA(q)); !bytes.Equal(got, want) {
						t.Fatalf("page %d of the range (GPA %#x) differs from guest.FillPage: %q... want %q...", q, dataPageGPA(q), got[:24], want[:24])
					}
				}
			}
		})
	}
}

// TestWriteProfile: with 4096-byte text writes every written page holds
// text only; with 64-byte random writes a write changes at most 64 bytes.
func TestWriteProfile(t *testing.T) {
	skipWithoutKVM(t)
	cfg := dirtyConfig(64<<20, 4<<20, 20000, guest.PatternRandom, 1)
	cfg.Workload.WriteBytes, cfg.Workload.WriteData = 4096, guest.WriteText
	g, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	mustResume(t, g)
	waitProgress(t, g, 1)
	time.Sleep(200 * time.Millisecond)
	mustPause(t, g)
	text := 0
	for p := uint64(0); p < touchedPages(cfg); p++ {
		page := g.pageAt(dataPageGPA(p))
		if binary.LittleEndian.Uint64(page) == p+1 {
			continue // not written since the touch
		}
		for _, c := range page {
			if c != ' ' && c != '\n' && (c < 'a' || c > 'z') {
				t.Fatalf("page %d holds %q after whole-page text writes", p, c)
			}
		}
		text++
	}
	if text < 100 {
		t.Fatalf("only %d pages rewritten with text", text)
	}
	t.Logf("%d pages rewritten with text", text)
}

// TestKVMillionKeys: a 1 GiB guest's table scales with memory (2,097,152
// slots) and holds 20,000 keys with 64-byte values, more than the old
// fixed table took (12,288); under TANDEM_LONG=1, 1,000,000 keys (about
// 30 s here).
func TestKVMillionKeys(t *testing.T) {
	skipWithoutKVM(t)
	keys := 20_000
	if os.Getenv("TANDEM_LONG") != "" {
		keys = 1_000_000
	}
	g, err := New(kvConfig(1<<30, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	var ok, bad atomic.Int64
	var lastBad atomic.Value
	var partial []byte
	g.Console().SetOutput(func(p []byte) {
		partial = append(partial, p...)
		for {
			i := bytes.IndexByte(partial, '\n')
			if i < 0 {
				return
			}
			if line := partial[:i]; bytes.HasSuffix(line, []byte(" OK")) {
				ok.Add(1)
			} else {
				bad.Add(1)
				lastBad.Store(string(line))
			}
			partial = partial[i+1:]
		}
	})
	mustResume(t, g)
	val := strings.Repeat("v", 64)
	start := time.Now()
	var batch []byte
	for i := 1; i <= keys; i++ {
		batch = fmt.Appendf(batch, "c:%d SET key-%07d %s\n", i, i, val)
		if len(batch) < 32<<10 && i < keys {
			continue
		}
		for ok.Load()+bad.Load() < int64(i-2000) {
			if time.Since(start) > 5*time.Minute {
				t.Fatalf("%d of %d answered after 5 min", ok.Load()+bad.Load(), i)
			}
			time.Sleep(100 * time.Microsecond)
		}
		for g.Console().Input(batch) != nil {
			time.Sleep(100 * time.Microsecond)
		}
		batch = batch[:0]
	}
	for ok.Load()+bad.Load() < int64(keys) && time.Since(start) < 5*time.Minute {
		time.Sleep(time.Millisecond)
	}
	if ok.Load() != int64(keys) {
		t.Fatalf("%d of %d SETs answered OK; last other reply %v", ok.Load(), keys, lastBad.Load())
	}
	mustPause(t, g)
	if slots := binary.LittleEndian.Uint64(g.pageAt(kvGPA)[8:]); slots != 1<<21 {
		t.Errorf("kv table has %d slots, want %d", slots, 1<<21)
	}
	t.Logf("%d SETs with 64-byte values in %v", keys, time.Since(start))
	lr := newLineReader()
	g.Console().SetOutput(lr.sink)
	mustResume(t, g)
	expect(t, ask(t, g, lr, "d:1 GET key-0000001"), "d:1 OK "+val)
	expect(t, ask(t, g, lr, fmt.Sprintf("d:2 GET key-%07d", keys)), "d:2 OK "+val)
	expect(t, ask(t, g, lr, "d:3 SET key-new x"), "d:3 OK")
}

// TestPageWrites: the micro-guest's own count of its page writes rises at
// the dirty rate asked for.
func TestPageWrites(t *testing.T) {
	skipWithoutKVM(t)
	g, err := New(dirtyConfig(64<<20, 16<<20, 20000, guest.PatternRandom, 2))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	mustResume(t, g)
	waitProgress(t, g, 1)
	w0, t0 := g.PageWrites(), time.Now()
	time.Sleep(500 * time.Millisecond)
	rate := float64(g.PageWrites()-w0) / time.Since(t0).Seconds()
	t.Logf("%.0f page writes/s, asked 20000", rate)
	if rate < 5000 || rate > 21000 { // the 2-core host is shared
		t.Fatalf("PageWrites rose %.0f/s, the guest was asked for 20000", rate)
	}
	mustPause(t, g)
	if w := g.PageWrites(); w == 0 {
		t.Fatal("no page writes counted")
	}
}
