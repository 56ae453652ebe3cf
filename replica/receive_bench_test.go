package replica

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/synth"
)

// The receive path alone: a recorded migration stream (random pages, so
// incompressible, in live epochs of 1,024 pages as precopy.LiveSender
// sends them) decoded, staged and committed into a fresh synth guest's
// memory, with no network. Beside it, in the same run, the floor: copy of
// the same page bytes into a fresh guest's memory (first-touch faults
// included, as the receiver pays them). "staged" is an FT epoch's path
// (pages staged, copied into memory at EndEpoch); "through" a migration
// destination's (Image.WriteThrough). Reports ns/page and MB/s of page
// content; the guest is built and closed outside the timer.
//
//	go test ./replica/ -run '^$' -bench ReceivePath -benchtime 10x -count 5

const (
	benchRecvMiB        = 64
	benchRecvEpochPages = 1024
)

// recordedStream is a stream of pages pages of random content at indices
// 0..pages-1, in epochs of benchRecvEpochPages, and the content.
func recordedStream(b *testing.B, comp checkpoint.Compression, pages int) ([]byte, []byte) {
	mem := make([]byte, pages*guest.PageSize)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i+8 <= len(mem); i += 8 {
		v := rng.Uint64()
		for k := 0; k < 8; k++ {
			mem[i+k] = byte(v >> (8 * k))
		}
	}
	var buf bytes.Buffer
	h := checkpoint.Header{Build: "bench", Kind: synth.Kind, Regions: []checkpoint.MemRegion{{GPA: 0, Size: uint64(len(mem))}}}
	w, err := checkpoint.NewWriter(&buf, h, checkpoint.Options{Compression: comp})
	if err != nil {
		b.Fatal(err)
	}
	epoch := uint64(0)
	for first := 0; first < pages; first += benchRecvEpochPages {
		var ps []checkpoint.Page
		for i := first; i < min(pages, first+benchRecvEpochPages); i++ {
			ps = append(ps, checkpoint.Page{Index: uint64(i), Data: mem[i*guest.PageSize : (i+1)*guest.PageSize]})
		}
		if err := w.WritePages(ps); err != nil {
			b.Fatal(err)
		}
		epoch++
		if _, err := w.EndEpoch(epoch); err != nil {
			b.Fatal(err)
		}
	}
	if err := w.EndStream(); err != nil {
		b.Fatal(err)
	}
	return buf.Bytes(), mem
}

func benchGuest(b *testing.B, size int) *synth.Guest {
	g, err := synth.New(guest.Config{Memory: uint64(size), VCPUs: 1, Workload: guest.Workload{Kind: guest.WorkloadKV}})
	if err != nil {
		b.Fatal(err)
	}
	return g
}

func BenchmarkReceivePath(b *testing.B) {
	pages := benchRecvMiB << 20 / guest.PageSize
	for _, comp := range []checkpoint.Compression{checkpoint.CompressNone, checkpoint.CompressDefault} {
		stream, mem := recordedStream(b, comp, pages)
		b.Run("copy/"+comp.String(), func(b *testing.B) {
			runRecvBench(b, pages, func(g *synth.Guest) {
				copy(g.Regions()[0].Mem, mem)
			})
		})
		for _, through := range []bool{false, true} {
			mode := "staged"
			if through {
				mode = "through"
			}
			b.Run("receive/"+mode+"/"+comp.String(), func(b *testing.B) {
				runRecvBench(b, pages, func(g *synth.Guest) {
					im := NewImage(g)
					if through {
						im.WriteThrough()
					}
					receiveStream(b, stream, im, pages/benchRecvEpochPages)
				})
			})
		}
	}
}

// receiveStream reads a whole stream into im and checks its epochs.
func receiveStream(b *testing.B, stream []byte, im *Image, epochs int) {
	rd, err := checkpoint.NewReader(bytes.NewReader(stream), checkpoint.Limits{})
	if err != nil {
		b.Fatal(err)
	}
	for {
		if _, err := rd.ReadEpoch(im); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			b.Fatal(err)
		}
	}
	if c := im.Committed(); c.Epochs != uint64(epochs) {
		b.Fatalf("%d epochs committed, want %d", c.Epochs, epochs)
	}
}

// runRecvBench times run over b.N fresh guests and reports per page.
func runRecvBench(b *testing.B, pages int, run func(*synth.Guest)) {
	b.SetBytes(int64(pages * guest.PageSize))
	var spent time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		g := benchGuest(b, pages*guest.PageSize)
		b.StartTimer()
		t0 := time.Now()
		run(g)
		spent += time.Since(t0)
		b.StopTimer()
		g.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(spent.Nanoseconds())/float64(b.N*pages), "ns/page")
}
