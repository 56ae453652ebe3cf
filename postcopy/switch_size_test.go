package postcopy

import (
	"io"
	"net"
	"testing"

	"github.com/tandemvm/tandem/precopy"
)

// The switch's downtime prediction (precopy) counts the missing set's
// bytes as MissingRunBytes a run plus MissingEndBytes: that is what
// SendMissing writes.
func TestMissingSetSize(t *testing.T) {
	missing := precopy.NewBitmap(1 << 16)
	runs := uint64(0)
	for p := uint64(0); p < 1<<16; p += 3 { // runs of 1 and of 2 pages
		missing.Set(p)
		if p%2 == 0 {
			missing.Set(p + 1)
		}
		runs++
	}
	a, b := net.Pipe()
	defer a.Close()
	got := make(chan int64, 1)
	go func() { n, _ := io.Copy(io.Discard, b); got <- n }()
	if err := SendMissing(a, missing, 0); err != nil {
		t.Fatal(err)
	}
	a.Close()
	if n, want := <-got, int64(runs*precopy.MissingRunBytes+precopy.MissingEndBytes); n != want {
		t.Fatalf("SendMissing wrote %d bytes for %d runs, the prediction counts %d", n, runs, want)
	}
}
