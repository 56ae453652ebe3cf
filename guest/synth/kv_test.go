package synth

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/tandemvm/tandem/guest"
)

func kvConfig() guest.Config {
	return guest.Config{Memory: 64 << 20, VCPUs: 2, Workload: guest.Workload{Kind: guest.WorkloadKV}}
}

// exchange sends lines and returns the replies.
func exchange(t *testing.T, g *Guest, out *output, lines ...string) []string {
	t.Helper()
	if err := g.Console().Input([]byte(strings.Join(lines, "\n") + "\n")); err != nil {
		t.Fatal(err)
	}
	return out.waitLines(t, len(lines))
}

func startKV(t *testing.T, cfg guest.Config) (*Guest, *output) {
	g := mustNew(t, cfg)
	out := &output{}
	g.Console().SetOutput(out.sink)
	mustResume(t, g)
	return g, out
}

func TestKVProtocol(t *testing.T) {
	g, out := startKV(t, kvConfig())
	got := exchange(t, g, out,
		"a:1 SET k1 v1",
		"a:2 GET k1",
		"a:3 GET nokey",
		"b:1 SET k1 other",
		"a:4 GET k1",
		"a:4 SET k1 ignored", // not above the highest seq: the last reply again
		"a:2 GET k1",         // older seq: the last reply again, too
		"a:5 DEL k1",
		"a:6 DEL k1",
		"a:7 GET k1",
		"a:8 PUT k v",
		"garbage",
		"a:9 SET k1 has space",
		"",
		"a:9 SET k1 v9\r",
		"b:2 GET k1",
	)
	want := []string{
		"a:1 OK",
		"a:2 OK v1",
		"a:3 NOTFOUND",
		"b:1 OK",
		"a:4 OK other",
		"a:4 OK other",
		"a:4 OK other",
		"a:5 OK",
		"a:6 NOTFOUND",
		"a:7 NOTFOUND",
		"a:8 ERR unknown command: want SET, GET or DEL",
		"ERR missing <client>:<seq>",
		"a:9 ERR SET takes 2 argument(s) separated by single spaces",
		"ERR empty request",
		"a:9 OK", // the malformed a:9 was not recorded
		"b:2 OK v9",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("replies:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// An over-long line is answered once and the line after it is served.
	long := "a:10 SET k " + strings.Repeat("x", 5000)
	got = exchange(t, g, out, long, "a:11 GET k1")
	if !slices.Equal(got, []string{"ERR line too long", "a:11 OK v9"}) {
		t.Fatalf("after long line: %q", got)
	}
}

func TestKVTableFull(t *testing.T) {
	cfg := kvConfig()
	cfg.Memory = 64 << 10 // 96 kv slots
	g, out := startKV(t, cfg)
	var lines []string
	for i := 1; i <= 200; i++ {
		lines = append(lines, fmt.Sprintf("c:%d SET key%d v%d", i, i, i))
	}
	got := exchange(t, g, out, lines...)
	full, firstFull := 0, 0
	for i, r := range got {
		if r == fmt.Sprintf("c:%d ERR table full", i+1) {
			full++
			if firstFull == 0 {
				firstFull = i + 1
			}
		} else if r != fmt.Sprintf("c:%d OK", i+1) {
			t.Fatalf("reply %d: %q", i+1, r)
		}
	}
	if full < 104 || firstFull == 0 {
		t.Fatalf("%d of 200 SETs refused in a 96-slot table", full)
	}
	// A key stored before the table filled is still there; deleting one
	// makes room again.
	got = exchange(t, g, out, "c:201 GET key1", "c:202 DEL key1", fmt.Sprintf("c:203 SET key%d v", firstFull))
	if !slices.Equal(got, []string{"c:201 OK v1", "c:202 OK", "c:203 OK"}) && got[2] != "c:203 ERR table full" {
		t.Fatalf("after full: %q", got)
	}
	if got[0] != "c:201 OK v1" || got[1] != "c:202 OK" {
		t.Fatalf("after full: %q", got)
	}
}

// A kv guest saved and restored into a fresh guest answers exactly as one
// that never stopped, including a retried request whose original reply was
// given before the save.
func TestKVSaveRestoreContinues(t *testing.T) {
	cfg := kvConfig()
	before := []string{"a:1 SET x 1", "b:1 SET y 2", "a:2 SET x 3", "b:2 DEL y", "c:5 GET x"}
	partial := "a:3 GET" // a request cut in the middle by the save
	after := []string{
		" x",            // completes a:3 GET x
		"a:2 SET x 999", // retry of a request served before the save
		"b:3 GET y",
		"c:6 SET z 7",
		"c:6 SET z 8", // retry after the save of a request served after it
		"a:4 GET x",
	}

	// The reference runs everything without a break.
	ref, refOut := startKV(t, cfg)
	exchange(t, ref, refOut, before...)
	ref.Console().Input([]byte(partial))
	want := exchange(t, ref, refOut, after...)

	g, out := startKV(t, cfg)
	exchange(t, g, out, before...)
	if err := g.Console().Input([]byte(partial)); err != nil {
		t.Fatal(err)
	}
	mustPause(t, g)
	img := capture(t, g)
	memDigest := guest.ScanMemory(g.Regions()).Sum()
	g.Close()

	r := img.restore(t, cfg)
	if d := guest.ScanMemory(r.Regions()).Sum(); d != memDigest {
		t.Fatal("restored memory differs")
	}
	if st, _ := r.SaveState(); guest.StateDigest(st) != guest.StateDigest(img.state) {
		t.Fatal("restored state saves differently")
	}
	rOut := &output{}
	r.Console().SetOutput(rOut.sink)
	mustResume(t, r)
	// "after" has 6 lines; the first completes the partial request.
	got := exchange(t, r, rOut, after...)
	if !slices.Equal(got, want) {
		t.Fatalf("restored guest replied\n%s\nuninterrupted guest replied\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	wantLit := []string{"a:3 OK 3", "a:3 OK 3", "b:3 NOTFOUND", "c:6 OK", "c:6 OK", "a:4 OK 3"}
	if !slices.Equal(got, wantLit) {
		t.Fatalf("restored guest replied %q, want %q", got, wantLit)
	}
}
