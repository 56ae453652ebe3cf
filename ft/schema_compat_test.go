package ft

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

// A snapshot written by the build before the network card (commit
// 635aff1: `tandem run --guest synth --workload kv --memory 4MiB`, two
// SETs on the console, `tandem migrate --to file:...`) loads in this
// build: its state has no synth-nic section, the guest comes back
// without a card, and its kv table answers as before.
func TestSnapshotOfBuildBeforeCardLoads(t *testing.T) {
	r := &replica.Receiver{NewGuest: EmptyGuest, Build: version.Build(), Log: quietLog(), Timeout: 5 * time.Second}
	res, err := r.RestoreFile("testdata/synth-kv-before-nic.snap")
	if err != nil {
		t.Fatalf("the old build's snapshot does not load: %v", err)
	}
	g := res.Guest
	defer g.Close()
	if guest.NICOf(g) != nil {
		t.Fatal("a guest from a stream without synth-nic has a card")
	}
	if _, ok := guest.StateSectionsOf(g)["synth-nic"]; ok {
		t.Fatal("it would list synth-nic to a receiver")
	}
	var mu sync.Mutex
	var out strings.Builder
	g.Console().SetOutput(func(p []byte) {
		mu.Lock()
		out.Write(p)
		mu.Unlock()
	})
	if _, err := g.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := g.Console().Input([]byte("new:1 GET colour\nnew:2 GET shape\n")); err != nil {
		t.Fatal(err)
	}
	want := "new:1 OK blue\nnew:2 OK round\n"
	eventually(t, "the old guest's kv table answers", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return strings.Contains(out.String(), want)
	})
}
